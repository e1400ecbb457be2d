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
        (out,) = self._guarded(db, "dedup", lambda: stages.dedup_many(db, [self["candidate_id"]]))
        if out.error:
            raise RuntimeError(f"dedup: {out.error}")
        return dedup_action(out, fw_spec)


@explicit_serialize
class FunnelTask(_AmdflowTask):
    """Relax with the funnel's universal potential, place on its ML hull, cut. Cut or a relaxed duplicate: defuse the rest.

    Passed: the relax Firework gets ``_priority`` = -(ML energy above the hull). The batched
    rocket (``amdflow rocket --stage funnel``) runs many of these in one relaxation batch.
    """

    required_params = ["candidate_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        (out,) = self._guarded(db, "funnel", lambda: stages.funnel_stage(db, [self["candidate_id"]]))
        if out.error:
            raise RuntimeError(f"funnel: {out.error}")
        return funnel_action(out, fw_spec)


@explicit_serialize
class RelaxTask(_AmdflowTask):
    """Relax the candidate with the campaign's engine; writes a task doc.

    With the funnel on, the funnel's decision is checked again first: a candidate now
    outside its cut completes this Firework without relaxing, defusing the rest. So does a
    candidate beyond the campaign's ``relax.budget`` (over_budget, released by ``amdflow budget``).
    """

    required_params = ["candidate_id"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        env = fw_spec.get("_fw_env", {})  # the FWorker's env: vasp_cmd, scratch_dir
        try:
            task_id = self._guarded(db, "relax", lambda: stages.relax_candidate_stage(db, self["candidate_id"], Path(os.getcwd()), env))
        except stages.FunnelCut as cut:
            return FWAction(stored_data={"funnel_cut": str(cut)}, defuse_workflow=True)
        except stages.OverBudget as over:  # waits: `amdflow budget` reruns this Firework
            return FWAction(stored_data={"over_budget": str(over)}, defuse_workflow=True)
        return FWAction(stored_data={"task_id": task_id}, update_spec=_pass_priority(fw_spec))

    def _guarded(self, db: AmdflowDB, stage: str, func: Any) -> Any:
        try:
            return func()
        except (stages.FunnelCut, stages.OverBudget):  # decisions, recorded by the stage: not failures
            raise
        except Exception as err:
            stages.record_failure(db, self["candidate_id"], stage, err)
            raise


@explicit_serialize
class RelaxReferenceTask(_AmdflowTask):
    """Relax one elemental reference phase with the campaign's engine and settings (``level`` funnel: the funnel's potential)."""

    required_params = ["campaign", "element", "prototype"]
    optional_params = ["level"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        ref_id = stages.relax_reference_stage(self.db(), self["campaign"], self["element"], self["prototype"],
                                              fw_spec.get("_fw_env", {}), self.get("level", "final"))
        return FWAction(stored_data={"ref_id": ref_id})


@explicit_serialize
class RelaxKnownTask(_AmdflowTask):
    """Relax one imported known phase with the campaign's engine and settings (``level`` funnel: the funnel's potential)."""

    required_params = ["campaign", "known_id"]
    optional_params = ["level"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        task_id = stages.relax_known_stage(self.db(), self["campaign"], self["known_id"], fw_spec.get("_fw_env", {}),
                                           self.get("level", "final"))
        return FWAction(stored_data={"task_id": task_id})


@explicit_serialize
class AnalyzeTask(_AmdflowTask):
    """Hull of the campaign's system (maggma ThermoBuilder), promising/ and the plot; ``level`` funnel: the funnel's ML hull.

    With ``rounds:`` (and ``rounds.auto``), a candidate's analysis that finishes its round closes the round (retrains,
    re-ranks) and opens the next (:func:`amdflow.stages.rounds.advance_quietly`; never fizzles this Firework)."""

    required_params = ["campaign"]
    optional_params = ["candidate_id", "level"]

    def run_task(self, fw_spec: dict[str, Any]) -> FWAction:
        db = self.db()
        if self.get("level", "final") == "funnel":
            return FWAction(stored_data=stages.funnel_hull_stage(db, self["campaign"]))
        summary = self._guarded(db, "analyze", lambda: stages.analyze_stage(db, self["campaign"], self.get("candidate_id")))
        if self.get("candidate_id"):  # with rounds: the round's last analysis closes it and opens the next
            from amdflow.stages.rounds import advance_quietly

            advanced = advance_quietly(db, self["campaign"])
            if advanced and advanced.get("closed"):
                summary = {**summary, "round_closed": advanced["closed"]["k"]}
        return FWAction(stored_data=summary)


def predict_action(out: stages.PredictOutcome) -> FWAction:
    """What a finished prediction does to its workflow (shared by PredictTask and the batched rocket)."""
    stored = {"formation_energy_per_atom": out.formation_energy_per_atom, "passed": out.passed}
    if not out.passed:
        return FWAction(stored_data=stored, defuse_workflow=True)
    return FWAction(stored_data=stored, update_spec={"_priority": priority_from_energy(out.formation_energy_per_atom)})


def dedup_action(out: stages.DedupOutcome, fw_spec: dict[str, Any]) -> FWAction:
    """What a dedup decision does to its workflow (shared by DedupTask and the batched rocket)."""
    if out.screened_out:
        return FWAction(stored_data={"screened_out": "top_k"}, defuse_workflow=True)
    if out.duplicate_of:
        return FWAction(stored_data={"duplicate_of": out.duplicate_of}, defuse_workflow=True)
    return FWAction(stored_data={"duplicate_of": None}, update_spec=_pass_priority(fw_spec))


def funnel_action(out: stages.FunnelOutcome, fw_spec: dict[str, Any]) -> FWAction:
    """What a funnel decision does to its workflow (shared by FunnelTask and the batched rocket)."""
    stored = {"passed": out.passed, "e_above_hull": out.e_above_hull, "reason": out.reason, "duplicate_of": out.duplicate_of}
    if not out.passed:
        return FWAction(stored_data=stored, defuse_workflow=True)
    if out.ml_failed:  # the potential's guard tripped: unranked, after every ranked candidate
        return FWAction(stored_data={**stored, "ml_failed": True}, update_spec={"_priority": stages.ML_FAILED_PRIORITY})
    if out.e_above_hull is None:  # deferred (no ML hull yet): keep the predicted-energy priority
        return FWAction(stored_data=stored, update_spec=_pass_priority(fw_spec))
    return FWAction(stored_data=stored, update_spec={"_priority": stages.priority_from_e_above_hull(out.e_above_hull)})


def priority_from_energy(formation_energy_per_atom: float) -> float:
    """Downstream ``_priority``: lower predicted energy runs first (FireWorks runs high first)."""
    return round(-float(formation_energy_per_atom), 6)
