"""The relax-engine seam: one result type and a factory keyed by the engine enum."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pymatgen.core import Structure

from amdflow.campaign import RelaxConfig, RelaxEngine


@dataclass
class RelaxResult:
    """Outcome of one relaxation (energies in eV, forces in eV/Angstrom)."""

    final_structure: Structure
    energy: float
    converged: bool
    n_steps: int
    max_force: float
    run_time_s: float
    details: dict[str, Any] = field(default_factory=dict)  # engine-specific: convergence, magnetization, corrections, inputs

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.final_structure)


class Engine(Protocol):
    """What every relax engine provides."""

    name: str
    run_type: str  # energies of one run type are comparable; thermo never mixes them
    note: str

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult: ...


def get_engine(cfg: RelaxConfig, device: str = "cpu", env: dict[str, Any] | None = None) -> Engine:
    """The engine a campaign's relax settings ask for (``env``: the FWorker's env, e.g. vasp_cmd)."""
    engine = RelaxEngine(cfg.engine)
    if engine is RelaxEngine.CHGNET:
        from amdflow.relax.chgnet_engine import CHGNetEngine

        return CHGNetEngine(cfg, device=device)
    if engine is RelaxEngine.VASP:
        from amdflow.relax.vasp.engine import VaspEngine

        return VaspEngine(cfg, env or {})
    if engine is RelaxEngine.CP2K:
        from amdflow.relax.cp2k import Cp2kEngine

        return Cp2kEngine(cfg, env or {})
    raise AssertionError(f"no engine for {engine}")  # pragma: no cover - every enum member is handled above
