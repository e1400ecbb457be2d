"""CHGNet relaxation: the laptop stand-in for DFT.

CHGNet (Deng et al., Nat. Mach. Intell. 2023) is a universal interatomic potential
trained on Materials Project GGA/GGA+U relaxations; its weights ship inside its wheel.
Its energies are NOT DFT energies: every task doc it writes says so (``engine_note``),
and its run type keeps it apart from DFT results in the hull.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from amdflow.campaign import RelaxConfig
from amdflow.relax.base import RelaxResult, file_sha256, run_type_name
from amdflow.relax.guards import GuardTripped, check_trajectory
from amdflow.thermo.corrections import CorrectionPolicy, policy_for

NOTE = "CHGNet universal potential: an ML energy, not a DFT energy (the laptop stand-in for DFT as relax.engine)"


@lru_cache(maxsize=2)
def _optimizer(device: str):
    from chgnet.model import CHGNet, StructOptimizer

    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet.load(use_device=device, verbose=False)
        opt = StructOptimizer(model=model, use_device=device)
    return model, opt


def chgnet_weights_sha256() -> str:
    """sha256 of the weights CHGNet.load() reads (its default pretrained model, in the wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("chgnet")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "pretrained" / "0.3.0"
    files = sorted(folder.glob("*.pth.tar"))
    if not files:
        raise FileNotFoundError(f"CHGNet's pretrained weights are missing from {folder}: reinstall chgnet")
    return file_sha256(files[0])


def chgnet_model_version(device: str = "cpu") -> str:
    model, _ = _optimizer(device)
    return str(getattr(model, "version", None) or "unknown")


class CHGNetEngine:
    """Relaxes positions and (optionally) the cell with CHGNet + ASE FIRE.

    ``cfg`` is anything with ``fmax``, ``max_steps`` and ``relax_cell``: the relax settings
    (CHGNet as the laptop stand-in for DFT) or the funnel's (CHGNet as the funnel's potential).
    """

    name = "chgnet"
    note = NOTE

    def __init__(self, cfg: RelaxConfig | Any, device: str = "cpu") -> None:
        self.cfg = cfg
        self.device = device

    @property
    def correction(self) -> CorrectionPolicy:
        return policy_for("chgnet", self.cfg)

    @property
    def run_type(self) -> str:
        import chgnet

        return run_type_name("chgnet", chgnet.__version__, self.correction.scheme, {
            "weights_sha256": chgnet_weights_sha256(), "fmax": float(self.cfg.fmax), "max_steps": int(self.cfg.max_steps),
            "relax_cell": bool(self.cfg.relax_cell)})

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult:
        _, opt = _optimizer(self.device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = opt.relax(
                structure,
                fmax=self.cfg.fmax,
                steps=self.cfg.max_steps,
                relax_cell=self.cfg.relax_cell,
                verbose=False,
            )
        traj = result["trajectory"]
        n_atoms = len(structure)
        reason = check_trajectory(structure, [abs(float(np.linalg.det(c))) / n_atoms for c in traj.cells],
                                  [float(e) / n_atoms for e in traj.energies])
        if reason is not None:  # the same guard as SevenNet's: a collapse is no record-low energy
            raise GuardTripped(reason)
        forces = np.asarray(traj.forces[-1])
        max_force = float(np.linalg.norm(forces, axis=1).max()) if forces.size else 0.0
        n_steps = max(len(traj.energies) - 1, 0)
        final = result["final_structure"]
        for key in list(final.site_properties):
            final.remove_site_property(key)
        return RelaxResult(
            final_structure=final,
            labels=_labels(structure, traj),
            energy=float(traj.energies[-1]),
            converged=max_force <= self.cfg.fmax * 1.0001 or n_steps < self.cfg.max_steps,
            n_steps=n_steps,
            max_force=max_force,
            run_time_s=time.perf_counter() - start,
        )

    def relax_many(self, structures: Sequence[Structure], workers: int = 1) -> list[RelaxResult | BaseException]:
        """Relax each structure; ``workers`` > 1 on a CPU: that many processes, one model and one torch thread each.

        CHGNet has no batched relaxation (torch-sim does not wrap it), and on small cells its
        per-step cost is overhead that a second torch thread does not share (measured: 16 cells
        in 49 s on one thread, 98 s on two), so cores are used by processes: 24 s with two.
        """
        if workers <= 1 or self.device != "cpu" or len(structures) < 2:
            return [_relax_or_error(self, s) for s in structures]
        pool = _pool(workers, self.device)
        settings = (float(self.cfg.fmax), int(self.cfg.max_steps), bool(self.cfg.relax_cell))
        return list(pool.map(_worker_relax, [(settings, s.as_dict()) for s in structures]))


def _labels(structure: Structure, traj: Any) -> list[dict[str, Any]]:
    """The first and last steps of a CHGNet trajectory as training labels (energies eV, forces eV/A, stresses as ASE
    reads them from CHGNet's calculator: eV/A^3, tensile positive)."""
    from amdflow.relax.finetune import label_frame

    out = []
    for i in sorted({0, len(traj.energies) - 1}):
        frame = Structure(traj.cells[i], structure.species, traj.atom_positions[i], coords_are_cartesian=True)
        stress = traj.stresses[i] if len(traj.stresses) > i else None
        out.append(label_frame(frame, float(traj.energies[i]), traj.forces[i], stress))
    return out


def _relax_or_error(engine: CHGNetEngine, structure: Structure) -> RelaxResult | BaseException:
    try:
        return engine.relax(structure)
    except Exception as err:  # one structure's failure is its own result, not the batch's
        return err


@lru_cache(maxsize=1)
def _pool(workers: int, device: str) -> Any:
    """Worker processes for CHGNet relaxations, kept for the process's lifetime."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    # one thread per worker, set before the workers' first import of torch and numpy (their OpenMP and
    # BLAS pools read these at start-up; limiting them afterwards did not help: measured)
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(device,))
        for f in [pool.submit(int) for _ in range(workers)]:  # start every worker now, under these variables
            f.result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return pool


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker(device: str) -> None:
    """One torch thread per worker process, else the workers oversubscribe the cores
    (measured: 2 workers took 157 s for 16 cells, with one thread each 24 s)."""
    import torch

    torch.set_num_threads(1)
    _optimizer(device)


def _worker_relax(job: tuple[tuple[float, int, bool], dict[str, Any]]) -> RelaxResult | BaseException:
    from types import SimpleNamespace

    (fmax, max_steps, relax_cell), structure = job
    engine = CHGNetEngine(SimpleNamespace(fmax=fmax, max_steps=max_steps, relax_cell=relax_cell), device="cpu")
    return _relax_or_error(engine, Structure.from_dict(structure))
