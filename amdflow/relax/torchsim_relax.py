"""Many relaxations at once on one model: torch-sim's batched FIRE with in-flight swapping.

A universal potential on a small cell spends most of a step on per-call overhead, so
relaxing structures together pays, on a GPU and (measured, ``scripts/bench_funnel.py``)
on CPU cores too. torch-sim (``torch-sim-atomistic`` 0.3.0, the last release for Python
3.11) provides the batched optimizer (``frechet_cell_fire``: FIRE with a Frechet cell
filter, each structure its own time step and mixing, so a structure's trajectory does not
depend on its batch mates) and the in-flight batcher (a finished structure leaves the
batch and the next one takes its place). Its ``optimize`` runner counts steps for the
whole batch (its own TODO) and converges on energy by default; this module drives the
same optimizer and batcher with per-structure bookkeeping instead: force convergence
(atoms and cell, the ASE criterion), a step limit per structure, and steps, final
largest force and convergence recorded for each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from pymatgen.core import Structure

from amdflow.relax.base import RelaxResult
from amdflow.relax.guards import (  # the guard every ML engine applies (see amdflow.relax.guards)
    ENERGY_FLOOR_EV_PER_ATOM,
    VOLUME_RATIO_MAX,
    VOLUME_RATIO_MIN,
    GuardTripped,
    unphysical_reason,
    volume_bounds,
)

__all__ = ["ENERGY_FLOOR_EV_PER_ATOM", "VOLUME_RATIO_MAX", "VOLUME_RATIO_MIN", "relax_structures"]


def relax_structures(structures: Sequence[Structure], model: Any, fmax: float, max_steps: int, relax_cell: bool = True,
                     max_atoms_in_flight: int = 512) -> list[RelaxResult | BaseException]:
    """Relax ``structures`` together with a torch-sim ``ModelInterface``; results in input order.

    ``max_atoms_in_flight`` bounds the atoms in one batched forward pass (memory); a
    structure that produces a non-finite energy ends with an exception in its place.
    """
    import torch
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher

    if not structures:
        return []
    start = time.perf_counter()
    init_fn, update_fn = (ts.frechet_cell_fire if relax_cell else ts.fire)(model=model)
    limit = float(max(max_atoms_in_flight, max(len(s) for s in structures)))
    states: list[Any] = []
    for chunk in _chunks(structures, int(limit)):  # initial forces, in batches too
        states.extend(init_fn(ts.initialize_state(list(chunk), model.device, model.dtype)).split())
    batcher = InFlightAutoBatcher(model, memory_scales_with="n_atoms", max_memory_scaler=limit, return_indices=True)
    batcher.load_states(states)
    steps = [0] * len(structures)
    start_volume = [s.volume / len(s) for s in structures]
    bounds = [volume_bounds(s) for s in structures]  # (lowest, highest) physical volume per atom
    record: dict[int, tuple[bool, float]] = {}  # original index -> (converged, largest force)
    broken: dict[int, str] = {}  # original index -> why the relaxation is unphysical
    finished: list[Any] = []
    state, _, idx = batcher.next_batch(None, None)
    while state is not None:
        if any(steps[i] < max_steps for i in idx):
            state = update_fn(state)
            for i in idx:
                steps[i] += 1
        force = _largest_force(state, relax_cell)
        energy_ok = torch.isfinite(state.energy)
        unphysical = _unphysical(state, [bounds[i] for i in idx])
        done = (force <= fmax) | ~energy_ok | unphysical | torch.tensor([steps[i] >= max_steps for i in idx], device=force.device)
        if not bool(done.any()):
            continue
        for k in torch.where(done)[0].tolist():
            record[idx[k]] = (bool(force[k] <= fmax) and bool(energy_ok[k]), float(force[k]))
            if bool(unphysical[k]) and bool(energy_ok[k]):
                broken[idx[k]] = _why_unphysical(state, k, bounds[idx[k]], start_volume[idx[k]], steps[idx[k]])
        state, completed, idx = batcher.next_batch(state, done)
        finished.extend(completed)
    ordered = batcher.restore_original_order(finished)
    share = (time.perf_counter() - start) / len(structures)
    out: list[RelaxResult | BaseException] = []
    for i, final in enumerate(ordered):
        converged, largest = record[i]
        energy = float(final.energy[0])
        if i in broken:
            out.append(GuardTripped(broken[i]))
            continue
        if not math.isfinite(energy):
            out.append(FloatingPointError(f"the relaxation diverged (energy {energy}) after {steps[i]} steps"))
            continue
        s = final.to_structures()[0]
        out.append(RelaxResult(final_structure=Structure(s.lattice, s.species, s.frac_coords), energy=energy,
                               converged=converged, n_steps=steps[i], max_force=largest, run_time_s=share,
                               details={"batched_with": len(structures), "optimizer": "torch-sim frechet_cell_fire"
                                        if relax_cell else "torch-sim fire"}))
    return out


def _chunks(structures: Sequence[Structure], max_atoms: int) -> list[Sequence[Structure]]:
    chunks, begin, atoms = [], 0, 0
    for k, s in enumerate(structures):
        if k > begin and atoms + len(s) > max_atoms:
            chunks.append(structures[begin:k])
            begin, atoms = k, 0
        atoms += len(s)
    chunks.append(structures[begin:])
    return chunks


def _per_system(state: Any) -> tuple[Any, Any]:
    """Per structure of the batch: volume per atom (A^3) and energy per atom (eV)."""
    import torch

    counts = torch.bincount(state.system_idx, minlength=state.n_systems).to(state.energy.dtype)
    volume = torch.linalg.det(state.cell).abs()
    return volume / counts, state.energy / counts


def _unphysical(state: Any, bounds: list[tuple[float, float]]) -> Any:
    import torch

    volume, energy = _per_system(state)
    low, high = (torch.tensor(b, dtype=volume.dtype, device=volume.device) for b in zip(*bounds, strict=True))
    return (volume < low) | (volume > high) | (energy < ENERGY_FLOOR_EV_PER_ATOM)


def _why_unphysical(state: Any, k: int, bounds: tuple[float, float], start_volume: float, steps: int) -> str:
    volume, energy = _per_system(state)
    reason = unphysical_reason(bounds, float(volume[k]), float(energy[k]), start_volume, steps)
    return reason or f"the relaxation went unphysical after {steps} steps"


def _largest_force(state: Any, relax_cell: bool) -> Any:
    """Per structure: the largest atomic force norm, and with the cell relaxed the largest cell-force row norm (eV/A)."""
    import torch

    norms = state.forces.norm(dim=1)
    largest = torch.zeros(state.n_systems, device=norms.device, dtype=norms.dtype)
    largest = largest.scatter_reduce(0, state.system_idx, norms, reduce="amax", include_self=True)
    if relax_cell and getattr(state, "cell_forces", None) is not None:
        largest = torch.maximum(largest, state.cell_forces.norm(dim=2).max(dim=1).values)
    return largest
