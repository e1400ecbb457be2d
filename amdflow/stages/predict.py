"""Predict: CGCNN formation energies for a batch of candidates, and the screen's decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymatgen.core import Structure
from pymongo import UpdateOne

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB, bulk_write
from amdflow.errors import AmdflowError
from amdflow.schemas import CandidateState, Prediction, utcnow
from amdflow.settings import get_settings, resolve_device
from amdflow.stages.common import failpoint_delay, load_campaign_config, record_failure


@dataclass(frozen=True)
class PredictOutcome:
    candidate_id: str
    formation_energy_per_atom: float
    passed: bool
    error: str | None = None  # set when this candidate could not be featurized


def predict_stage(db: AmdflowDB, candidate_ids: list[str], workers: int = 1) -> list[PredictOutcome]:
    """CGCNN formation energy for candidates (one batch), screen, record on each doc.

    ``workers`` featurize in parallel (the batched rocket). A candidate whose structure
    cannot be featurized is marked failed and returned with ``error``; the others go on.
    """
    from amdflow.screen.predict import get_predictor, predict_sources

    settings = get_settings()
    failpoint_delay("AMDFLOW_FAILPOINT_PREDICT_DELAY_S")  # tests: a batch that is surely mid-run when killed
    docs = list(db.candidates.find({"candidate_id": {"$in": candidate_ids}}, {"_id": 0, "candidate_id": 1, "campaign": 1, "structure": 1,
                                                                                   "template.source": 1}))
    found = {d["candidate_id"] for d in docs}
    missing = [c for c in candidate_ids if c not in found]
    if missing:
        raise AmdflowError(f"candidates {missing[:3]} are not in the database: re-add the campaign")
    outcomes: list[PredictOutcome] = []
    by_campaign: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_campaign.setdefault(d["campaign"], []).append(d)
    for name, group in by_campaign.items():
        cfg, _ = load_campaign_config(db, name)
        predictor = get_predictor(cfg.screen.checkpoint, resolve_device(settings))
        result = predict_sources(predictor, [d["structure"] for d in group], workers, settings.predict_batch_size)
        for index, message in result.errors.items():
            cid = group[index]["candidate_id"]
            record_failure(db, cid, "predict", AmdflowError(message))
            outcomes.append(PredictOutcome(cid, float("nan"), False, message))
        keep = [i for i in range(len(group)) if i not in result.errors]
        group = [group[i] for i in keep]
        energies = result.values[keep]
        threshold = cfg.screen.max_formation_energy_per_atom
        db.campaigns.update_one({"name": name}, {"$set": {"model_id": predictor.model_id}})
        phases = _hull_phases(db, cfg) if cfg.screen.mode == "hull" else []
        writes: list[UpdateOne] = []
        for d, energy in zip(group, energies, strict=True):
            unscreened = cfg.screen.random_pass and (d.get("template") or {}).get("source") == "random"
            passed = bool(energy <= threshold) or unscreened
            reason = None if passed else f"predicted formation energy {energy:.3f} > {threshold} eV/atom"
            e_hull = None
            if cfg.screen.mode == "hull" and not unscreened:
                from amdflow.thermo.hull import predicted_e_above_hull

                formula = Structure.from_dict(d["structure"]).composition.reduced_formula
                e_hull = predicted_e_above_hull(formula, float(energy), phases, cfg.elements)
                if passed and e_hull > cfg.screen.max_e_above_hull:
                    passed, reason = False, f"predicted {e_hull:.3f} eV/atom above the current hull > {cfg.screen.max_e_above_hull}"
            pred = Prediction(formation_energy_per_atom=float(energy), model_id=predictor.model_id,
                              model_name=predictor.checkpoint.name, threshold=threshold, passed=passed,
                              mode=cfg.screen.mode, e_above_hull=e_hull, reason=reason, unscreened=unscreened)
            state = CandidateState.PASSED if passed else CandidateState.SCREENED_OUT
            writes.append(UpdateOne({"candidate_id": d["candidate_id"]},
                                    {"$set": {"state": state.value, "updated_at": utcnow(), "prediction": pred.to_mongo(), "error": None}}))
            outcomes.append(PredictOutcome(d["candidate_id"], float(energy), passed))
        bulk_write(db.candidates, writes)  # one command per batch, not one per candidate
    return outcomes


def _hull_phases(db: AmdflowDB, cfg: CampaignConfig) -> list[tuple[str, float]]:
    """(formula, formation energy per atom) of every computed phase on the campaign's hull."""
    _, doc = load_campaign_config(db, cfg.name)
    return [(t["formula"], t["formation_energy_per_atom"])
            for t in db.thermo.find({"hull_chemsys": cfg.chemsys, "run_type": doc["run_type"]}, {"formula": 1, "formation_energy_per_atom": 1})]
