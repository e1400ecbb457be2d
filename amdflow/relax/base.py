"""The relax-engine seam: one result type and a factory keyed by the engine enum."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pymatgen.core import Structure

from amdflow.campaign import FunnelConfig, FunnelEngine, RelaxConfig, RelaxEngine
from amdflow.errors import AmdflowError

if TYPE_CHECKING:  # amdflow.thermo pulls in pymatgen's phase diagrams (and matplotlib): only where energies are corrected
    from amdflow.thermo.corrections import Corrected, CorrectionPolicy, CorrectionScheme


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
    #: training labels of a final engine (amdflow.relax.finetune.label_frame): its first and last ionic steps
    labels: list[dict[str, Any]] = field(default_factory=list)

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.final_structure)


class Engine(Protocol):
    """What every relax engine provides."""

    name: str
    run_type: str  # energies of one run type are comparable; thermo never mixes them
    note: str
    correction: CorrectionPolicy  # the correction its energies get (its scheme is in the run type)

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult: ...


def run_type_name(engine: str, label: str, scheme: CorrectionScheme | str, settings: dict[str, Any]) -> str:
    """A run type: engine, model or input set, correction scheme, and a hash of every other setting that moves an
    energy (relaxation settings included: a looser fmax stops elsewhere), e.g. 'sevennet-7net-0-0.13.0-mp2020-1a2b3c4d'."""
    import hashlib
    import json

    from amdflow.thermo.corrections import CorrectionScheme

    key = json.dumps(settings, sort_keys=True, default=str)
    return f"{engine}-{label}-{CorrectionScheme(scheme).value}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (checkpoints, weights), cached per path, size and modification time."""
    p = Path(path)
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corrected_energy(engine: Any, result: RelaxResult) -> Corrected:
    """A relaxation's energy on its run type's scale: the engine's correction policy applied to the final structure
    (with the run's own +U parameters when the engine reports them, else MP's for the structure)."""
    from amdflow.thermo.corrections import CorrectionScheme, correct

    policy = getattr(engine, "correction", None)
    scheme = policy.scheme if policy is not None else CorrectionScheme.NONE
    return correct(result.final_structure, result.energy, scheme, result.details.get("correction_parameters"))


def get_funnel_engine(cfg: FunnelConfig, device: str = "cpu", max_atoms_in_flight: int | None = None) -> Engine:
    """The universal potential a campaign's funnel asks for (``cfg.enabled`` must be true).

    ``max_atoms_in_flight``: atoms in one batched forward pass (SevenNet through torch-sim).
    """
    engine = FunnelEngine(cfg.engine)
    if engine is FunnelEngine.CHGNET:
        from amdflow.relax.chgnet_engine import CHGNetEngine

        return CHGNetEngine(cfg, device=device)
    if engine is FunnelEngine.SEVENNET:
        from amdflow.relax.sevennet_engine import SevenNetEngine

        return SevenNetEngine(cfg, device=device, max_atoms_in_flight=max_atoms_in_flight)
    raise AmdflowError("the campaign's funnel is off (funnel.engine: none): it has no engine")


def relax_many(engine: Engine, structures: list[Structure], workers: int = 1) -> list[RelaxResult | BaseException]:
    """Relax many structures with one engine: its batched path when it has one, else one after another."""
    batched = getattr(engine, "relax_many", None)
    if batched is not None:
        return batched(structures, workers)
    out: list[RelaxResult | BaseException] = []
    for s in structures:
        try:
            out.append(engine.relax(s))
        except Exception as err:  # one structure's failure is its own result
            out.append(err)
    return out


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


LAUNCHERS = {"srun", "mpirun", "mpiexec", "aprun", "ibrun", "jsrun", "orterun"}


def require_executable(cmd: str, what: str, setting: str) -> None:
    """Fail early, in one line, when a DFT command cannot run here (instead of a Custodian traceback).

    Checks the program, and for MPI launchers (``srun vasp_std``, ``mpirun -np 4 vasp_std``)
    also the program they launch.
    """
    import os
    import shlex
    import shutil

    try:
        parts = shlex.split(cmd)
    except ValueError as err:
        raise AmdflowError(f"{what} command {cmd!r} cannot be parsed ({err}): fix {setting}") from None
    if not parts:
        raise AmdflowError(f"{what} command is empty: fix {setting}")
    programs = [parts[0]]
    if os.path.basename(parts[0]) in LAUNCHERS:
        rest = [p for p in parts[1:] if not p.startswith("-") and not p.replace(".", "").isdigit()]
        if rest:
            programs.append(rest[-1])
    for prog in programs:
        found = shutil.which(prog) if os.sep not in prog else (prog if os.access(prog, os.X_OK) and os.path.isfile(prog) else None)
        if found is None:
            raise AmdflowError(f"{what} command {cmd!r}: {prog!r} not found or not executable on {os.uname().nodename}: "
                               f"load its module in the queue adapter's pre_rocket, or fix {setting}")


class WalltimeStop(AmdflowError):
    """The DFT code was stopped cleanly before the queue's walltime (Custodian's WalltimeHandler).

    The run is not finished: its last structure (``structure``, from CONTCAR) is kept so a
    rerun continues from it instead of starting again.
    """

    def __init__(self, message: str, structure: Structure, directory: Path) -> None:
        super().__init__(message)
        self.structure = structure
        self.directory = directory
