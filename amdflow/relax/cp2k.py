"""CP2K through Custodian: the open DFT engine that runs anywhere (Debian's ``cp2k`` package).

Inputs come from pymatgen's CP2K sets (CELL_OPT / GEO_OPT / ENERGY_FORCE) with one
:class:`~amdflow.campaign.Cp2kConfig` for candidates and references. Three traps
measured here are handled: pymatgen's sets turn spin polarization on unless told
(``spin_polarized`` follows the spin policy), they restart from any wavefunction file
left in the folder (a fresh folder and ``SCF_GUESS ATOMIC``), and Gamma-only sampling of
small cells drifts badly (k-points from a density per reciprocal volume, at least 2 per
direction). Basis sets and pseudopotentials are found in CP2K's data folder
(``CP2K_DATA_DIR``, default Debian's ``/usr/share/cp2k``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import Cp2kConfig, RelaxConfig, SpinPolicy
from amdflow.errors import AmdflowError
from amdflow.relax.base import RelaxResult, run_type_name
from amdflow.thermo.corrections import CorrectionPolicy, policy_for

NOTE = "CP2K through Custodian (pymatgen CP2K set, GTH pseudopotentials, MOLOPT basis)"
HARTREE_TO_EV = 27.211386245988
BOHR_TO_ANGSTROM = 0.529177210903
RUN_TYPES = {"cell_opt": "CellOptSet", "geo_opt": "RelaxSet", "static": "StaticSet"}
HANDLERS = ("UnconvergedScfErrorHandler", "DivergingScfErrorHandler", "FrozenJobErrorHandler", "AbortHandler",
            "NumericalPrecisionHandler", "StdErrHandler")


def data_dir() -> Path:
    return Path(os.environ.get("CP2K_DATA_DIR", "/usr/share/cp2k"))


def _names_in(path: Path, element: str) -> set[str]:
    """Names (with aliases) of the basis sets or potentials of ``element`` in a CP2K data file."""
    names: set[str] = set()
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == element and not parts[1][0].isdigit():
            names.update(parts[1:])
    return names


def kpoint_mesh(structure: Structure, density: float) -> tuple[int, int, int]:
    """A Gamma-centred mesh from a density per reciprocal volume, at least 2 per direction (never Gamma-only)."""
    from pymatgen.io.vasp.inputs import Kpoints

    kpts = Kpoints.automatic_density_by_vol(structure, round(density), force_gamma=True).kpts[0]
    return tuple(max(2, int(k)) for k in kpts)  # type: ignore[return-value]


def input_set(structure: Structure, cfg: Cp2kConfig) -> Any:
    """The pymatgen CP2K set for ``structure`` (basis and potential checked against the data files)."""
    from pymatgen.io.cp2k import sets
    from pymatgen.io.vasp.inputs import Kpoints

    basis_file, pot_file = data_dir() / "BASIS_MOLOPT", data_dir() / "GTH_POTENTIALS"
    if not basis_file.exists() or not pot_file.exists():
        raise AmdflowError(f"CP2K data files not found in {data_dir()}: install CP2K (Debian: apt-get install cp2k) "
                           "or set CP2K_DATA_DIR to the folder holding BASIS_MOLOPT and GTH_POTENTIALS")
    bp: dict[str, Any] = {"basis_filenames": ["BASIS_MOLOPT"], "potential_filename": "GTH_POTENTIALS"}
    for el in sorted(structure.symbol_set):
        if cfg.basis not in _names_in(basis_file, el):
            raise AmdflowError(f"CP2K basis {cfg.basis} has no entry for {el} in {basis_file}: choose another relax.cp2k.basis")
        if cfg.potential not in _names_in(pot_file, el):
            raise AmdflowError(f"CP2K potential {cfg.potential} has no entry for {el} in {pot_file}: choose another relax.cp2k.potential")
        bp[el] = {"basis": cfg.basis, "potential": cfg.potential}
    from amdflow.relax.vasp.inputs import is_magnetic

    spin = cfg.spin is SpinPolicy.ON or (cfg.spin is SpinPolicy.AUTO and is_magnetic(structure))
    cls = getattr(sets, RUN_TYPES[cfg.job])
    override = {"FORCE_EVAL": {"DFT": {"SCF": {"SCF_GUESS": "ATOMIC"}}}}
    cp2k_input = cls(structure=structure, basis_and_potential=bp, xc_functionals=["PBE"], cutoff=cfg.cutoff, rel_cutoff=cfg.rel_cutoff,
                     kpoints=Kpoints.gamma_automatic(kpoint_mesh(structure, cfg.kpoint_density)), multiplicity=0, ot=False,
                     smearing=cfg.smearing, spin_polarized=spin, eps_scf=cfg.eps_scf, eps_default=cfg.eps_default,
                     override_default_params=override)
    if cfg.job != "static":  # the set adds MOTION after the overrides: set the optimizer's limits on the result
        section = "CELL_OPT" if cfg.job == "cell_opt" else "GEO_OPT"
        # every criterion scales with max_force, in CP2K's own ratios (defaults: 4.5e-4 Ha/bohr, RMS 3e-4,
        # steps 3e-3/1.5e-3 bohr, 100 bar): CP2K converges only when all of them hold
        f = cfg.max_force / 4.5e-4
        limits: dict[str, Any] = {"MAX_FORCE": cfg.max_force, "RMS_FORCE": 3e-4 * f, "MAX_DR": 3e-3 * f, "RMS_DR": 1.5e-3 * f,
                                  "MAX_ITER": cfg.max_iter}
        if cfg.job == "cell_opt":
            limits["KEEP_SYMMETRY"] = True  # like VASP's ISIF=3 with symmetry on: the prototype's symmetry is kept
            limits["PRESSURE_TOLERANCE"] = 100.0 * f  # bar
        cp2k_input.update({"MOTION": {section: limits}})
    return cp2k_input


def write_inputs(structure: Structure, cfg: Cp2kConfig, directory: Path) -> Path:
    """A fresh folder with cp2k.inp (an old wavefunction would be picked up as a restart)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.wfn*"):
        old.unlink()
    input_set(structure, cfg).write_file(str(directory / "cp2k.inp"))
    return directory


def run_custodian(directory: Path, cfg: Cp2kConfig, cmd: str, poll_s: float = 10.0) -> list[dict[str, Any]]:
    from custodian import Custodian
    from custodian.cp2k import handlers as ch
    from custodian.cp2k.jobs import Cp2kJob

    handlers = [getattr(ch, h)() if h == "StdErrHandler" else getattr(ch, h)(input_file="cp2k.inp", output_file="cp2k.out")
                for h in HANDLERS]
    job = Cp2kJob(shlex.split(cmd), input_file="cp2k.inp", output_file="cp2k.out")
    # custodian's CP2K StdErrHandler opens its file relative to the working directory: run from inside the folder
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        c = Custodian(handlers, [job], max_errors=cfg.max_errors, polling_time_step=poll_s, monitor_freq=max(1, int(30 / poll_s)))
        return list(c.run())
    finally:
        os.chdir(cwd)


def parse_cp2k_dir(directory: Path) -> dict[str, Any]:
    """Energy (eV), final structure and convergence from cp2k.out."""
    from pymatgen.io.cp2k.outputs import Cp2kOutput

    path = Path(directory) / "cp2k.out"
    if not path.exists():
        raise AmdflowError(f"no cp2k.out in {directory}: CP2K left no output (check std_err.txt there)")
    out = Cp2kOutput(str(path), auto_load=True)
    if not out.completed:
        raise AmdflowError(f"{path}: CP2K did not finish; rerun it")
    energy = float(out.final_energy)
    structure = out.final_structure
    forces = out.data.get("forces") or []
    import numpy as np

    max_force = float(np.linalg.norm(np.asarray(forces[-1]), axis=1).max()) if len(forces) else 0.0
    text = path.read_text(errors="replace")
    optimized = "OPTIMIZATION COMPLETED" in text  # an optimizer that stopped at MAX_ITER says so only by omission
    converged = bool(out.completed) and (optimized or str(out.run_type).upper() in ("ENERGY", "ENERGY_FORCE"))
    return {"energy": energy, "structure": structure, "nsites": len(structure), "n_steps": max(len(out.structures) - 1, 0) if out.structures else 0,
            "max_force": max_force, "converged": converged, "run_type": str(out.run_type), "cp2k_version": out.cp2k_version,
            "spin_polarized": bool(out.spin_polarized)}


class Cp2kEngine:
    """Relaxes with CP2K under Custodian; the command comes from the FWorker's env (cp2k_cmd) or AMDFLOW_CP2K_CMD."""

    name = "cp2k"
    note = NOTE

    def __init__(self, cfg: RelaxConfig, env: dict[str, Any]) -> None:
        self.cfg = cfg
        self.env = env

    @property
    def correction(self) -> CorrectionPolicy:
        return policy_for("cp2k", self.cfg)

    @property
    def run_type(self) -> str:
        c = self.cfg.cp2k.model_dump(mode="json")
        keys = ("cutoff", "rel_cutoff", "kpoint_density", "basis", "potential", "spin", "smearing", "eps_scf", "eps_default",
                "job", "max_force", "max_iter")
        return run_type_name("cp2k", "pbe", self.correction.scheme, {k: c[k] for k in keys})

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult:
        from amdflow.settings import get_settings

        settings = get_settings()
        cmd = self.env.get("cp2k_cmd") or settings.cp2k_cmd or (shutil.which("cp2k.psmp") or shutil.which("cp2k"))
        if not cmd:
            raise AmdflowError("no CP2K command: install CP2K (Debian: apt-get install cp2k) or set cp2k_cmd in the FWorker's env "
                               "or AMDFLOW_CP2K_CMD")
        from amdflow.relax.base import require_executable

        require_executable(cmd, "CP2K", "cp2k_cmd in the FWorker's env or AMDFLOW_CP2K_CMD")
        if directory is None:
            tag = hashlib.sha256(json.dumps(structure.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
            directory = Path.cwd() / f"cp2k-{structure.composition.reduced_formula}-{tag}"
        start = time.perf_counter()
        write_inputs(structure, self.cfg.cp2k, directory)
        log = run_custodian(directory, self.cfg.cp2k, cmd, settings.custodian_poll_s)
        doc = parse_cp2k_dir(directory)
        corrections = [{"job": i, "errors": c.get("errors", []), "actions": c.get("actions", [])}
                       for i, run in enumerate(log) for c in run.get("corrections", [])]
        return RelaxResult(final_structure=doc["structure"], energy=doc["energy"], converged=doc["converged"], n_steps=doc["n_steps"],
                           max_force=doc["max_force"], run_time_s=time.perf_counter() - start,
                           details={"corrections": corrections, "run_type": doc["run_type"], "cp2k_version": doc["cp2k_version"],
                                    "spin_polarized": doc["spin_polarized"], "dir_name": str(directory)})
