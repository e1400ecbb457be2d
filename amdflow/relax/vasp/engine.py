"""The VASP relax engine: pymatgen inputs -> Custodian -> task fields, behind the engine seam."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import RelaxConfig
from amdflow.errors import AmdflowError
from amdflow.relax.base import RelaxResult, run_type_name
from amdflow.relax.vasp.inputs import write_inputs
from amdflow.relax.vasp.parse import parse_vasp_dir
from amdflow.relax.vasp.run import run_custodian
from amdflow.thermo.corrections import CorrectionPolicy, policy_for

NOTE = "VASP through Custodian (pymatgen input set)"
#: Settings that change energies; the run type hashes them so that thermo never mixes two.
ENERGY_SETTINGS = ("input_set", "incar", "kpoint_density", "potcars", "potcar_functional", "spin", "hubbard")
LARGE_OUTPUTS = ("WAVECAR", "CHGCAR", "CHG", "PROCAR", "LOCPOT", "AECCAR0", "AECCAR1", "AECCAR2", "ELFCAR")


class VaspEngine:
    """Relaxes with VASP under Custodian; the VASP command comes from the FWorker's env or the settings."""

    name = "vasp"
    note = NOTE

    def __init__(self, cfg: RelaxConfig, env: dict[str, Any]) -> None:
        self.cfg = cfg
        self.env = env

    @property
    def correction(self) -> CorrectionPolicy:
        return policy_for("vasp", self.cfg)

    @property
    def run_type(self) -> str:
        vasp = self.cfg.vasp.model_dump(mode="json")
        settings = {**{k: vasp[k] for k in ENERGY_SETTINGS}, "relax_cell": bool(self.cfg.relax_cell)}
        return run_type_name("vasp", vasp["input_set"], self.correction.scheme, settings)

    def _vasp_settings(self) -> Any:
        """The VASP settings of a run: ``relax.relax_cell: false`` relaxes positions only (ISIF 2) unless the INCAR
        overrides say otherwise."""
        if self.cfg.relax_cell or "ISIF" in self.cfg.vasp.incar:
            return self.cfg.vasp
        return self.cfg.vasp.model_copy(update={"incar": {**self.cfg.vasp.incar, "ISIF": 2}})

    def _command(self) -> tuple[str, str | None, bool, float]:
        from amdflow.settings import get_settings

        settings = get_settings()
        cmd = self.env.get("vasp_cmd") or settings.vasp_cmd
        if not cmd:
            raise AmdflowError("no VASP command: set vasp_cmd in the FWorker's env (fw_configs/my_fworker_vasp.yaml) "
                               "or AMDFLOW_VASP_CMD, e.g. 'srun vasp_std'")
        from amdflow.relax.base import require_executable

        require_executable(cmd, "VASP", "vasp_cmd in the FWorker's env or AMDFLOW_VASP_CMD")
        return cmd, self.env.get("scratch_dir") or settings.vasp_scratch_dir, settings.vasp_potcar_spec, settings.custodian_poll_s

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult:
        cmd, scratch, potcar_spec, poll_s = self._command()
        if directory is None:
            tag = hashlib.sha256(json.dumps(structure.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
            directory = Path.cwd() / f"vasp-{structure.composition.reduced_formula}-{tag}"
        start = time.perf_counter()
        vasp = self._vasp_settings()
        write_inputs(structure, vasp, directory, "relax", potcar_spec=potcar_spec)
        run_custodian(directory, vasp, cmd, scratch, poll_s)
        doc = parse_vasp_dir(directory)
        finish_outputs(directory, vasp.outputs)
        final = Structure.from_dict(doc["structure"])
        if any("Walltime reached" in c.get("errors", []) for c in doc.get("corrections") or []):
            # Custodian stops the job sequence without an error: the energy of this run is not a result.
            from amdflow.relax.base import WalltimeStop

            raise WalltimeStop(f"VASP was stopped before the queue's walltime after {doc['n_ionic_steps']} ionic steps of "
                               f"{doc.get('final_run')} in {directory}: the relaxation is unfinished; `amdflow rerun CAMPAIGN "
                               "--fizzled` continues from its last structure (or give the queue more time)", final, directory)
        details = {k: doc.get(k) for k in ("final_run", "converged_electronic", "converged_ionic", "forces_converged",
                                             "stress_converged", "max_stress_kbar", "total_magnetization", "site_magnetization",
                                             "corrections", "incar", "kpoints", "potcar_symbols", "run_type", "vasp_version",
                                             "is_hubbard", "hubbards")}
        details["vasp_run_time_s"] = doc.get("run_time_s")
        # what MP2020 reads: the run's own +U (GGA+U when any U was on)
        hubbards = {k: float(v) for k, v in (doc.get("hubbards") or {}).items() if float(v) > 0}
        details["correction_parameters"] = {"run_type": "GGA+U" if doc.get("is_hubbard") and hubbards else "GGA",
                                            "is_hubbard": bool(doc.get("is_hubbard") and hubbards), "hubbards": hubbards}
        details["dir_name"] = str(directory)
        return RelaxResult(final_structure=final, energy=doc["energy"], converged=bool(doc["converged_electronic"] and doc["converged_ionic"]),
                           n_steps=doc["n_ionic_steps"], max_force=doc["max_force"], run_time_s=time.perf_counter() - start,
                           details=details, labels=doc.get("labels") or [])


def finish_outputs(directory: Path, policy: str) -> None:
    """Per ``relax.vasp.outputs``: keep, gzip, or delete the large volumetric files and gzip the rest."""
    import gzip
    import shutil

    if policy == "keep":
        return
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file() or path.suffix == ".gz" or path.name.startswith("."):
            continue
        if policy == "remove_large" and path.name.split(".")[0] in LARGE_OUTPUTS:
            path.unlink()
            continue
        with path.open("rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
