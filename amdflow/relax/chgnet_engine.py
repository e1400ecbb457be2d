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
from functools import lru_cache
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from amdflow.campaign import RelaxConfig
from amdflow.relax.base import RelaxResult

NOTE = "CHGNet universal potential: laptop stand-in for DFT, not a DFT energy"


@lru_cache(maxsize=2)
def _optimizer(device: str):
    from chgnet.model import CHGNet, StructOptimizer

    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet.load(use_device=device, verbose=False)
        opt = StructOptimizer(model=model, use_device=device)
    return model, opt


def chgnet_model_version(device: str = "cpu") -> str:
    model, _ = _optimizer(device)
    return str(getattr(model, "version", None) or "unknown")


class CHGNetEngine:
    """Relaxes positions and (optionally) the cell with CHGNet + ASE FIRE."""

    name = "chgnet"
    note = NOTE

    def __init__(self, cfg: RelaxConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        self.device = device

    @property
    def run_type(self) -> str:
        import chgnet

        return f"chgnet-{chgnet.__version__}"

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
        forces = np.asarray(traj.forces[-1])
        max_force = float(np.linalg.norm(forces, axis=1).max()) if forces.size else 0.0
        n_steps = max(len(traj.energies) - 1, 0)
        final = result["final_structure"]
        for key in list(final.site_properties):
            final.remove_site_property(key)
        return RelaxResult(
            final_structure=final,
            energy=float(traj.energies[-1]),
            converged=max_force <= self.cfg.fmax * 1.0001 or n_steps < self.cfg.max_steps,
            n_steps=n_steps,
            max_force=max_force,
            run_time_s=time.perf_counter() - start,
        )
