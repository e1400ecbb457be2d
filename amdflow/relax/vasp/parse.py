"""A task document from a finished VASP folder (vasprun.xml, OUTCAR, custodian.json).

The energy is pymatgen's ``Vasprun.final_energy`` of the last run in the folder (the
static run after a double relaxation, else the last relaxation), so what amdflow stores
is what pymatgen reads from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from amdflow.errors import AmdflowError

#: Run files in the order Custodian writes them; the last one present is the result.
RUN_SUFFIXES = ("", ".relax1", ".relax2", ".static")


def _find(directory: Path, stem: str, suffix: str) -> Path | None:
    for candidate in (directory / f"{stem}{suffix}", directory / f"{stem}{suffix}.gz"):
        if candidate.exists():
            return candidate
    return None


def final_run_suffix(directory: Path) -> str:
    """The suffix of the last run in the folder ('' for a single run)."""
    found = [s for s in RUN_SUFFIXES if _find(directory, "vasprun.xml", s)]
    if not found:
        raise AmdflowError(f"no vasprun.xml in {directory}: the VASP run left no output (check vasp.out and std_err.txt there)")
    order = {".static": 3, ".relax2": 2, ".relax1": 1, "": 0}
    return max(found, key=order.__getitem__)


def _sigma0_energy(step: dict[str, Any]) -> float | None:
    """An ionic step's energy sigma->0, with pymatgen's fix for vasprun.xml files whose e_0_energy is wrong (VASP
    forum t=16942; pymatgen's Vasprun.final_energy applies it to the last step): free energy plus the last electronic
    step's (e_0 - e_fr)."""
    estep = (step.get("electronic_steps") or [{}])[-1]
    if step.get("e_fr_energy") is not None and estep.get("e_0_energy") is not None and estep.get("e_fr_energy") is not None:
        return float(step["e_fr_energy"]) + float(estep["e_0_energy"]) - float(estep["e_fr_energy"])
    return step.get("e_0_energy")


def ionic_step_labels(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first and last ionic steps of a run as training labels (amdflow.relax.finetune.label_frame): energy sigma->0
    (what MPtrj's uncorrected_total_energy is), forces, and the stress in ASE's convention (VASP's kbar converted)."""
    from amdflow.relax.finetune import label_frame, vasp_stress_to_ase

    out = []
    for i in sorted({0, len(steps) - 1}) if steps else []:
        step = steps[i]
        structure = step["structure"]
        energy = _sigma0_energy(step)
        if energy is None or step.get("forces") is None:
            continue
        stress = vasp_stress_to_ase(step["stress"]) if step.get("stress") is not None else None
        out.append(label_frame(structure, float(energy), step["forces"], stress))
    return out


def parse_vasp_dir(directory: Path, force_tol: float = 0.05, stress_tol_kbar: float = 5.0) -> dict[str, Any]:
    """Energies, structure, convergence, magnetization, run time, corrections and inputs of the folder's final run."""
    from pymatgen.io.vasp.outputs import Outcar, Vasprun

    directory = Path(directory)
    suffix = final_run_suffix(directory)
    path = _find(directory, "vasprun.xml", suffix)
    assert path is not None
    try:
        vr = Vasprun(str(path), parse_potcar_file=False, parse_dos=False, parse_eigen=False, exception_on_bad_xml=True)
    except Exception as err:  # truncated or corrupt XML: a clear error, the Firework fizzles with it
        raise AmdflowError(f"{path} cannot be parsed ({type(err).__name__}): the run did not finish; rerun it") from err
    structure = vr.final_structure
    last = vr.ionic_steps[-1]
    forces = np.asarray(last["forces"] if last.get("forces") is not None else np.zeros((len(structure), 3)), dtype=float)
    stress = np.asarray(last["stress"] if last.get("stress") is not None else np.zeros((3, 3)), dtype=float)
    max_force = float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0
    max_stress = float(np.abs(stress).max())
    doc: dict[str, Any] = {
        "labels": ionic_step_labels(vr.ionic_steps),
        "dir_name": str(directory.resolve()),
        "final_run": path.name,
        "energy": float(vr.final_energy),
        "energy_per_atom": float(vr.final_energy) / len(structure),
        "structure": structure.as_dict(),
        "formula": structure.composition.reduced_formula,
        "nsites": len(structure),
        "n_ionic_steps": len(vr.ionic_steps),
        "converged_electronic": bool(vr.converged_electronic),
        "converged_ionic": bool(vr.converged_ionic),
        "max_force": max_force,
        "max_stress_kbar": max_stress,
        "forces_converged": max_force <= force_tol,
        "stress_converged": max_stress <= stress_tol_kbar,
        "run_type": str(vr.run_type),
        "vasp_version": vr.vasp_version,
        "incar": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dict(vr.incar).items()},
        "kpoints": vr.kpoints.as_dict() if vr.kpoints is not None else None,
        "potcar_symbols": list(vr.potcar_symbols),
        "is_hubbard": bool(vr.is_hubbard),
        "hubbards": dict(vr.hubbards),
    }
    outcar_path = _find(directory, "OUTCAR", suffix)
    if outcar_path is not None:
        outcar = Outcar(str(outcar_path))
        doc["total_magnetization"] = None if outcar.total_mag is None else float(outcar.total_mag)
        doc["site_magnetization"] = [float(m.get("tot", 0.0)) for m in (outcar.magnetization or [])]
        stats = outcar.run_stats or {}
        doc["run_time_s"] = stats.get("Elapsed time (sec)")
    doc["corrections"] = read_corrections(directory)
    return doc


def read_corrections(directory: Path) -> list[dict[str, Any]]:
    """Custodian's corrections (errors and actions per job) from custodian.json, if present."""
    for name in ("custodian.json", "custodian.json.gz"):
        path = Path(directory) / name
        if path.exists():
            import gzip

            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as fh:
                runs = json.load(fh)
            return [{"job": i, "errors": c.get("errors", []), "actions": c.get("actions", [])}
                    for i, run in enumerate(runs) for c in run.get("corrections", [])]
    return []

