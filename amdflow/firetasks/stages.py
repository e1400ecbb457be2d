"""The Firetasks. Each gets ids as parameters, calls :mod:`amdflow.stages`, returns an FWAction.

The tasks need the rocket's LaunchPad (``_add_launchpad_and_fw_id`` in the spec): they
use its connection for amdflow's collections, so the embedded store and MongoDB share
one code path. A stage that raises records the reason on the candidate and re-raises,
leaving the Firework FIZZLED for ``lpad rerun_fws`` / ``amdflow rerun``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fireworks import FiretaskBase, FWAction, explicit_serialize

from amdflow import stages
from amdflow.db import AmdflowDB


class _AmdflowTask(FiretaskBase):
    launchpad: Any

    def db(self) -> AmdflowDB:
        lp = getattr(self, "launchpad", None)
        if lp is None:
            raise RuntimeError("amdflow Firetasks need '_add_launchpad_and_fw_id': True in the Firework spec")
        return AmdflowDB.from_launchpad(lp)

    def _guarded(self, db: AmdflowDB, stage: str, func: Any) -> Any:
        try:
            return func()
        except Exception as err:
            if self.get("candidate_id"):
                stages.record_failure(db, self["candidate_id"], stage, err)
            raise


def _pass_priority(fw_spec: dict[str, Any]) -> dict[str, Any]:
    return {"_priority": fw_spec["_priority"]} if "_priority" in fw_spec else {}


@explicit_serialize
class PredictTask(_AmdflowTask):
    """CGCNN prediction + screen. Screened out: defuse the rest of the workflow. Else children get ``_priority`` = -E_f."""

    required_params = ["candidate_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        (out,) = self._guarded(db, "predict", lambda: stages.predict_stage(db, [self["candidate_id"]]))
        if out.error:
            raise RuntimeError(f"predict: {out.error}")
        return predict_action(out)


@explicit_serialize
class DedupTask(_AmdflowTask):
    """StructureMatcher dedup within the reduced formula. Duplicate: defuse the rest of the workflow."""

    required_params = ["candidate_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        dup = self._guarded(db, "dedup", lambda: stages.dedup_stage(db, self["candidate_id"]))
        if dup == stages.SCREENED_BY_TOP_K:
            return FWAction(stored_data={"screened_out": "top_k"}, defuse_workflow=True)
        if dup:
            return FWAction(stored_data={"duplicate_of": dup}, defuse_workflow=True)
        return FWAction(stored_data={"duplicate_of": None}, update_spec=_pass_priority(fw_spec))


@explicit_serialize
class RelaxTask(_AmdflowTask):
    """Relax the candidate with the campaign's engine; writes a task doc."""

    required_params = ["candidate_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        env = fw_spec.get("_fw_env", {})  # the FWorker's env: vasp_cmd, scratch_dir
        task_id = self._guarded(db, "relax", lambda: stages.relax_candidate_stage(db, self["candidate_id"], Path(os.getcwd()), env))
        return FWAction(stored_data={"task_id": task_id}, update_spec=_pass_priority(fw_spec))


@explicit_serialize
class RelaxReferenceTask(_AmdflowTask):
    """Relax one elemental reference phase with the campaign's engine and settings."""

    required_params = ["campaign", "element", "prototype"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        ref_id = stages.relax_reference_stage(self.db(), self["campaign"], self["element"], self["prototype"], fw_spec.get("_fw_env", {}))
        return FWAction(stored_data={"ref_id": ref_id})


@explicit_serialize
class RelaxKnownTask(_AmdflowTask):
    """Relax one imported known phase with the campaign's engine and settings."""

    required_params = ["campaign", "known_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        task_id = stages.relax_known_stage(self.db(), self["campaign"], self["known_id"], fw_spec.get("_fw_env", {}))
        return FWAction(stored_data={"task_id": task_id})


@explicit_serialize
class AnalyzeTask(_AmdflowTask):
    """Hull of the campaign's system (maggma ThermoBuilder), promising/ and the plot."""

    required_params = ["campaign"]
    optional_params = ["candidate_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        summary = self._guarded(db, "analyze", lambda: stages.analyze_stage(db, self["campaign"], self.get("candidate_id")))
        return FWAction(stored_data=summary)


def predict_action(out: stages.PredictOutcome) -> FWAction:
    """What a finished prediction does to its workflow (shared by PredictTask and the batched rocket)."""
    stored = {"formation_energy_per_atom": out.formation_energy_per_atom, "passed": out.passed}
    if not out.passed:
        return FWAction(stored_data=stored, defuse_workflow=True)
    return FWAction(stored_data=stored, update_spec={"_priority": priority_from_energy(out.formation_energy_per_atom)})


def priority_from_energy(formation_energy_per_atom: float) -> float:
    """Downstream ``_priority``: lower predicted energy runs first (FireWorks runs high first)."""
    return round(-float(formation_energy_per_atom), 6)
