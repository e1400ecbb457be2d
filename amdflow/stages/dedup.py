"""Dedup: one representative per structure family of a reduced formula (and the top-k screen).

How it scales with a formula of thousands of screened candidates:

* **Buckets.** A formula's candidates split by an exact invariant, the site count of the
  matcher's own reduced cell (:func:`amdflow.select.dedup.dedup_bucket`; why it is exact is
  written there and tested against plain ``StructureMatcher``). Two buckets never hold a
  match, so each has its own claim and rockets dedup one formula in parallel.
* **One pass per bucket.** Whoever takes a bucket's claim decides *every* undecided
  member of it, in rank order (:func:`amdflow.select.dedup.greedy_families`), each
  structure decoded and reduced once; decided duplicates are never read again. The other
  members' dedup Fireworks then find their decision recorded and only return it. The
  outcome depends on the ranks only, not on which Firework ran first.
* **Batched.** :func:`dedup_many` decides many candidates (the batched CPU rocket,
  ``amdflow rocket --stage dedup``, and ``amdflow run``); :func:`dedup_stage` is the
  one-Firework path and gives the same answers.

A candidate predicted after its bucket was decided meets the representatives kept so far:
exactly one representative per family still holds, but it is then the first decided, not
necessarily the lowest (predictions run first, by priority, so this is rare).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pymatgen.core import Structure
from pymongo import UpdateOne

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB, bulk_write
from amdflow.errors import AmdflowError
from amdflow.schemas import CandidateState, DedupRecord, utcnow
from amdflow.stages.common import claim, failpoint_delay, load_campaign_config

SCREENED_BY_TOP_K = "top_k"  # dedup_stage's answer when the top-k screen removed the candidate

# A representative: kept by dedup, and anything later stages made of it (waiting, relaxed by the funnel, passed or cut
# or a duplicate only after that relaxation, waiting for the DFT budget, relaxed, analyzed).
KEPT_STATES = [s.value for s in (CandidateState.UNIQUE, CandidateState.PRERELAXED, CandidateState.FUNNEL_CUT,
                                 CandidateState.DUPLICATE, CandidateState.OVER_BUDGET, CandidateState.RELAXED,
                                 CandidateState.ANALYZED)]


@dataclass(frozen=True)
class DedupOutcome:
    candidate_id: str
    duplicate_of: str | None = None
    screened_out: bool = False  # by the top-k screen (cfg.screen.mode == "top_k")
    error: str | None = None


def dedup_stage(db: AmdflowDB, candidate_id: str) -> str | None:
    """Dedup one candidate (its bucket, if undecided); the id it duplicates, None if kept, or ``SCREENED_BY_TOP_K``."""
    (out,) = dedup_many(db, [candidate_id])
    if out.error:
        raise AmdflowError(out.error)
    return SCREENED_BY_TOP_K if out.screened_out else out.duplicate_of


def dedup_many(db: AmdflowDB, candidate_ids: list[str]) -> list[DedupOutcome]:
    """Decide the candidates (and every undecided member of their buckets); one outcome per id, in order.

    A candidate without a passing prediction gets an outcome with ``error`` (its Firework fizzles alone).
    """
    fields = {"_id": 0, "candidate_id": 1, "campaign": 1, "formula": 1, "prediction": 1, "state": 1, "dedup": 1}
    docs = {d["candidate_id"]: d for d in db.candidates.find({"candidate_id": {"$in": list(candidate_ids)}}, fields)}
    missing = [c for c in candidate_ids if c not in docs]
    if missing:
        raise AmdflowError(f"candidates {missing[:3]} are not in the database: was it deleted? re-add the campaign")
    errors: dict[str, str] = {}
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for cid, d in docs.items():
        if not d.get("prediction"):
            errors[cid] = f"candidate {cid} has no prediction: run its predict Firework first"
        elif _decided(d) is None:
            groups[(d["campaign"], d["formula"])].append(cid)
    configs: dict[str, CampaignConfig] = {}
    for (campaign, formula), ids in groups.items():
        if campaign not in configs:
            configs[campaign] = load_campaign_config(db, campaign)[0]
        _dedup_formula(db, configs[campaign], formula, set(ids))
    if groups:
        docs = {d["candidate_id"]: d for d in db.candidates.find({"candidate_id": {"$in": list(candidate_ids)}}, fields)}
    outcomes = []
    for cid in candidate_ids:
        decided = None if cid in errors else _decided(docs[cid])
        if cid not in errors and decided is None:
            errors[cid] = f"candidate {cid} was not decided (state {docs[cid].get('state')}): `amdflow rerun` its dedup"
        outcomes.append(decided or DedupOutcome(cid, error=errors[cid]))
    return outcomes


def _decided(doc: dict[str, Any]) -> DedupOutcome | None:
    """The recorded outcome of a candidate doc, or None while undecided."""
    record = doc.get("dedup") or {}
    if "compared" in record:
        return DedupOutcome(doc["candidate_id"], record.get("duplicate_of"))
    prediction = doc.get("prediction") or {}
    if doc.get("state") == CandidateState.SCREENED_OUT.value and prediction.get("passed") is False:
        return DedupOutcome(doc["candidate_id"], screened_out=True)
    return None


def _dedup_formula(db: AmdflowDB, cfg: CampaignConfig, formula: str, running: set[str]) -> None:
    """Top-k screen, buckets, then one greedy pass per bucket holding one of ``running`` (the Fireworks being run).

    ``running`` candidates are decided whatever their state (a rerun of a fizzled dedup finds its candidate FAILED);
    other members only while PASSED (kept by the screen, nothing else done to them).
    """
    from amdflow.select.dedup import dedup_bucket, dedup_matcher, reduce_for_matching

    campaign = cfg.name
    base = {"campaign": campaign, "formula": formula, "prediction.passed": True}
    if cfg.screen.mode == "top_k":
        with claim(db, f"dedup-top-k:{campaign}:{formula}"):
            _screen_top_k(db, cfg, formula, running)
    matcher = dedup_matcher(cfg.dedup.ltol, cfg.dedup.stol, cfg.dedup.angle_tol)
    reduced: dict[str, Structure] = {}  # this call's reductions: each structure decoded and reduced once
    missing = {**base, "dedup_bucket": None}
    if db.candidates.find_one(missing, {"_id": 1}) is not None:
        # a bucket is a pure function of the structure: computed once for the formula, by whoever comes first
        with claim(db, f"dedup-buckets:{campaign}:{formula}"):
            writes = []
            for d in db.candidates.find(missing, {"_id": 0, "candidate_id": 1, "structure": 1}):
                reduced[d["candidate_id"]] = reduce_for_matching(Structure.from_dict(d["structure"]), matcher)
                writes.append(UpdateOne({"candidate_id": d["candidate_id"]},
                                        {"$set": {"dedup_bucket": dedup_bucket(reduced[d["candidate_id"]])}}))
            bulk_write(db.candidates, writes)
    pending = sorted({d["dedup_bucket"] for d in db.candidates.find({"candidate_id": {"$in": list(running)}},
                                                                     {"dedup_bucket": 1, "prediction.passed": 1})
                      if (d.get("prediction") or {}).get("passed") is True})
    random.shuffle(pending)  # rockets on one formula start on different buckets (the outcome does not depend on it)
    while pending:
        for bucket in list(pending):  # every bucket no other rocket is deciding right now
            with claim(db, f"dedup:{campaign}:{formula}:{bucket}", wait=False) as held:
                if held:
                    _decide_bucket(db, cfg, formula, bucket, running, matcher, reduced)
                    pending.remove(bucket)
        if pending:  # the rest are being decided elsewhere: wait for one, then look again
            with claim(db, f"dedup:{campaign}:{formula}:{pending[0]}"):
                _decide_bucket(db, cfg, formula, pending.pop(0), running, matcher, reduced)


def _screen_top_k(db: AmdflowDB, cfg: CampaignConfig, formula: str, running: set[str]) -> None:
    """Screen out the undecided candidates ranked k+1 or later among the formula's passed ones, by (energy, id);
    random-search candidates passed unscreened (screen.random_pass) neither count nor are removed."""
    k = cfg.screen.top_k
    passed = sorted(((p["prediction"]["formation_energy_per_atom"], p["candidate_id"], p)
                     for p in db.candidates.find({"campaign": cfg.name, "formula": formula, "prediction.passed": True,
                                                  "prediction.unscreened": {"$ne": True}},
                                                 {"_id": 0, "candidate_id": 1, "prediction.formation_energy_per_atom": 1,
                                                  "dedup": 1, "state": 1})), key=lambda t: t[:2])
    writes = []
    for rank, (_, cid, p) in enumerate(passed):
        if rank < k or "compared" in (p.get("dedup") or {}):
            continue
        if p.get("state") != CandidateState.PASSED.value and cid not in running:
            continue
        reason = f"rank {rank + 1} of its formula by predicted energy; top_k is {k}"
        writes.append(UpdateOne({"candidate_id": cid}, {"$set": {
            "state": CandidateState.SCREENED_OUT.value, "updated_at": utcnow(), "prediction.passed": False,
            "prediction.reason": reason}}))
    bulk_write(db.candidates, writes)


def _decide_bucket(db: AmdflowDB, cfg: CampaignConfig, formula: str, bucket: int, running: set[str],
                   matcher: Any, reduced: dict[str, Structure]) -> None:
    """Inside the bucket's claim: decide every undecided member against the representatives, in rank order."""
    from amdflow.select.dedup import Member, greedy_families, reduce_for_matching

    query = {"campaign": cfg.name, "formula": formula, "prediction.passed": True, "dedup_bucket": bucket}
    members = list(db.candidates.find(query, {"_id": 0, "candidate_id": 1, "prediction.formation_energy_per_atom": 1,
                                              "state": 1, "dedup": 1}))
    reps, undecided = [], []
    for m in members:
        record = m.get("dedup") or {}
        if "compared" in record:
            if record.get("duplicate_of") is None and m.get("state") in KEPT_STATES:
                reps.append(m)
        elif m.get("state") == CandidateState.PASSED.value or m["candidate_id"] in running:
            undecided.append(m)
    if not undecided:
        return
    need = [m["candidate_id"] for m in reps + undecided if m["candidate_id"] not in reduced]
    if need:
        for d in db.candidates.find({"candidate_id": {"$in": need}}, {"_id": 0, "candidate_id": 1, "structure": 1}):
            reduced[d["candidate_id"]] = reduce_for_matching(Structure.from_dict(d["structure"]), matcher)

    def member(m: dict[str, Any]) -> Member:
        return Member(m["candidate_id"], m["prediction"]["formation_energy_per_atom"], reduced[m["candidate_id"]])

    failpoint_delay("AMDFLOW_FAILPOINT_DEDUP_DELAY_S")  # tests widen the read-decide-write window
    decisions = greedy_families([member(m) for m in undecided], [member(m) for m in reps], matcher)
    now = utcnow()
    bulk_write(db.candidates, [UpdateOne({"candidate_id": d.candidate_id}, {"$set": {
        "state": (CandidateState.DUPLICATE if d.duplicate_of else CandidateState.UNIQUE).value, "updated_at": now,
        "error": None, "dedup": DedupRecord(duplicate_of=d.duplicate_of, compared=d.compared).to_mongo()}})
        for d in decisions])
