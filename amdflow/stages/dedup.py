"""Dedup: one representative per structure family of a reduced formula (and the top-k screen)."""

from __future__ import annotations

from typing import Any

from pymatgen.core import Structure

from amdflow.db import AmdflowDB
from amdflow.errors import AmdflowError
from amdflow.schemas import CandidateState, DedupRecord
from amdflow.stages.common import (
    claim,
    failpoint_delay,
    load_campaign_config,
    load_candidate,
    set_state,
)

SCREENED_BY_TOP_K = "top_k"  # dedup_stage's answer when the top-k screen removed the candidate


def top_k_rank(db: AmdflowDB, campaign: str, formula: str, candidate_id: str, energy: float) -> int:
    """How many candidates of the formula that passed the screen rank before this one by (energy, id)."""
    ahead = 0
    for p in db.candidates.find({"campaign": campaign, "formula": formula, "prediction.passed": True, "candidate_id": {"$ne": candidate_id}},
                                {"candidate_id": 1, "prediction.formation_energy_per_atom": 1}):
        if (p["prediction"]["formation_energy_per_atom"], p["candidate_id"]) < (energy, candidate_id):
            ahead += 1
    return ahead


def dedup_stage(db: AmdflowDB, candidate_id: str) -> str | None:
    """Keep one member of each structure family; returns the id duplicated, if any.

    Decisions for one (campaign, formula) are serialized by a claim, so two rockets can
    never both keep members of one family. Inside the claim a candidate first meets the
    family's representatives already decided (the first decided wins), then the rule of
    :func:`amdflow.select.dedup.find_representative` among the lower-energy undecided
    ones. Dedup Fireworks run lowest predicted energy first (``_priority``), so the
    representative is the lowest-energy member whenever the predictions come first.
    """
    doc = load_candidate(db, candidate_id)
    with claim(db, f"dedup:{doc['campaign']}:{doc['formula']}"):
        return _dedup_decision(db, candidate_id)


def _dedup_decision(db: AmdflowDB, candidate_id: str) -> str | None:
    from amdflow.select.dedup import Peer, find_representative

    doc = load_candidate(db, candidate_id)
    cfg, _ = load_campaign_config(db, doc["campaign"])
    if not doc.get("prediction"):
        raise AmdflowError(f"candidate {candidate_id} has no prediction: run its predict Firework first")
    if cfg.screen.mode == "top_k":
        energy = doc["prediction"]["formation_energy_per_atom"]
        rank = top_k_rank(db, doc["campaign"], doc["formula"], candidate_id, energy)
        if rank >= cfg.screen.top_k:
            reason = f"rank {rank + 1} of its formula by predicted energy; top_k is {cfg.screen.top_k}"
            set_state(db, candidate_id, CandidateState.SCREENED_OUT,
                       **{"prediction.passed": False, "prediction.reason": reason})
            return SCREENED_BY_TOP_K
    peers = [
        Peer(p["candidate_id"], p["prediction"]["formation_energy_per_atom"], Structure.from_dict(p["structure"]),
             (p.get("dedup") or {}).get("duplicate_of"))
        for p in db.candidates.find(
            {"campaign": doc["campaign"], "formula": doc["formula"], "candidate_id": {"$ne": candidate_id}, "prediction.passed": True},
            {"_id": 0, "candidate_id": 1, "prediction": 1, "structure": 1, "dedup": 1},
        )
    ]
    structure = Structure.from_dict(doc["structure"])
    decided = [p for p in peers if (p.candidate_id in _decided_unique(db, doc))]
    failpoint_delay("AMDFLOW_FAILPOINT_DEDUP_DELAY_S")  # tests widen the read-decide-write window
    dup, compared = None, 0
    if decided:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        matcher = StructureMatcher(ltol=cfg.dedup.ltol, stol=cfg.dedup.stol, angle_tol=cfg.dedup.angle_tol)
        for rep in sorted(decided, key=lambda p: (p.energy, p.candidate_id)):
            compared += 1
            if matcher.fit(structure, rep.structure):
                dup = rep.candidate_id
                break
    if dup is None:
        undecided = [p for p in peers if p.candidate_id not in {d.candidate_id for d in decided}]
        dup, more = find_representative(candidate_id, doc["prediction"]["formation_energy_per_atom"], structure, undecided,
                                        cfg.dedup.ltol, cfg.dedup.stol, cfg.dedup.angle_tol)
        compared += more
    record = DedupRecord(duplicate_of=dup, compared=compared).to_mongo()
    set_state(db, candidate_id, CandidateState.DUPLICATE if dup else CandidateState.UNIQUE, dedup=record)
    return dup


def _decided_unique(db: AmdflowDB, doc: dict[str, Any]) -> set[str]:
    """Ids of the formula's candidates already kept by dedup (representatives).

    Kept by dedup and then anything later stages made of them: waiting, relaxed by the
    funnel (passed or cut, or a duplicate only after that relaxation), relaxed, analyzed.
    """
    later = [CandidateState.UNIQUE, CandidateState.PRERELAXED, CandidateState.FUNNEL_CUT, CandidateState.DUPLICATE,
             CandidateState.RELAXED, CandidateState.ANALYZED]
    return {c["candidate_id"] for c in db.candidates.find(
        {"campaign": doc["campaign"], "formula": doc["formula"], "dedup.duplicate_of": None, "dedup.compared": {"$exists": True},
         "state": {"$in": [s.value for s in later]}},
        {"candidate_id": 1})}
