"""Funnel: relax the candidates dedup kept with a universal potential, place them on that
potential's own hull, and send to the final relax (DFT) only those close to it.

CGCNN on unrelaxed substitutions is a weak stability filter (``../shared/design/funnel.md``);
a universal potential that relaxes the structure ranks far better. The rules here:

* **One potential per hull.** The funnel's relaxations are task documents of the
  potential's run type (``level: funnel``); the elemental references and known phases of
  that hull are relaxed with the same potential (reference and known workflows at the
  funnel level), and the ThermoBuilder builds its hull like any other. No ML energy is
  ever placed on a DFT hull or the reverse: run types are never mixed.
* **The hull as it stands.** A candidate is decided on the ML hull at the time its
  relaxation finishes (its batch included). The relax Firework checks again just before
  the final relaxation starts (candidates relaxed later may have lowered the hull) and
  stops there, with the reason, if the candidate is now above the cut.
* **Dedup again.** Two templates can relax into one crystal: a relaxed candidate that
  matches another of its formula (StructureMatcher, the campaign's tolerances) is a
  duplicate of the one with the lower ML energy, unless the other's final relaxation has
  started (that one is kept: it has been paid for). Decisions of one formula are
  serialized by a claim, and every read they rest on is made inside it; candidates
  waiting for the DFT budget count as kept.
* **A hole in the potential is no verdict.** A relaxation that trips the guard
  (:mod:`amdflow.relax.guards`), or whose formation energy on the ML hull lies below
  :data:`amdflow.thermo.hull.FORMATION_ENERGY_FLOOR` (such an entry never shapes the hull),
  passes on flagged ``ml_failed``, after every ranked candidate (its priority is below
  theirs), starting the final relax from its own cell. A random-search start is the
  exception: it is one draw of many, so one in a hole is cut (``funnel.hole``) and the
  search's other starts stand for it: passing them on would spend DFT on the potential's
  failures (11 of 50 KMgH3 starts tripped the guard before its collapse bound was fixed).
* **Energies on one scale.** Ranks and hulls use the task's energy on the run type's
  scale (its correction scheme applied, :mod:`amdflow.thermo.corrections`).
* **Priorities.** A candidate that passes hands its ML energy above the hull to its relax
  Firework as ``_priority`` (lowest first); when a later build moves a waiting
  candidate's position, its relax Firework's priority follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymatgen.core import Structure
from pymongo import ReplaceOne, UpdateOne

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB, bulk_write
from amdflow.errors import AmdflowError
from amdflow.schemas import CandidateState, FunnelRecord, utcnow
from amdflow.settings import get_settings, resolve_device
from amdflow.stages.common import (
    HULL_CLAIM_STALE_S,
    ClaimTimeout,
    claim,
    failpoint_delay,
    load_campaign_config,
    record_failure,
    set_state,
)
from amdflow.stages.tasks import task_doc

logger = logging.getLogger(__name__)

LEVEL = "funnel"
#: States of candidates the funnel relaxed and kept (passed, cut or waiting for the DFT budget; a duplicate is neither)
KEPT_AFTER_FUNNEL = (CandidateState.PRERELAXED.value, CandidateState.FUNNEL_CUT.value, CandidateState.OVER_BUDGET.value,
                     CandidateState.RELAXED.value, CandidateState.ANALYZED.value)
#: Of those, the ones a lower-energy twin may still make its duplicate (their final relaxation has not started)
DEMOTABLE = (CandidateState.PRERELAXED.value, CandidateState.FUNNEL_CUT.value, CandidateState.OVER_BUDGET.value)
#: How long a funnel batch waits for a formula's claim before leaving that formula's candidates to a rerun
FORMULA_CLAIM_TIMEOUT_S = 600.0


class FunnelCut(Exception):
    """The relax stage's check: the candidate is no longer within the funnel's cut (reason in the message)."""


@dataclass(frozen=True)
class FunnelOutcome:
    candidate_id: str
    passed: bool
    e_above_hull: float | None = None
    reason: str | None = None
    duplicate_of: str | None = None
    deferred: bool = False
    error: str | None = None  # the relaxation failed: the candidate is marked failed, its Firework fizzles
    ml_failed: bool = False  # the potential's guard tripped: passed on, after every ranked candidate


def funnel_engine(cfg: CampaignConfig) -> Any:
    from amdflow.relax import get_funnel_engine

    settings = get_settings()
    return get_funnel_engine(cfg.funnel, resolve_device(settings), settings.funnel_max_atoms)


def funnel_task_id(candidate_id: str, run_type: str) -> str:
    return f"{candidate_id}-funnel-{run_type}"


#: Relax Fireworks after the funnel sit below every dedup and funnel Firework (those carry -E_f, a few eV/atom
#: at most): where one queue runs both (a laptop's `amdflow run`), every candidate is placed on the ML hull before
#: the first final relaxation is decided on it.
RELAX_AFTER_FUNNEL_PRIORITY = -100.0


def priority_from_e_above_hull(e_above_hull: float) -> float:
    """The relax Firework's ``_priority``: lower ML energy above the hull runs first (FireWorks runs high first)."""
    return round(RELAX_AFTER_FUNNEL_PRIORITY - float(e_above_hull), 6)


#: A candidate whose ML relaxation tripped the guard relaxes after every ranked one (those sit within a few eV/atom).
ML_FAILED_PRIORITY = RELAX_AFTER_FUNNEL_PRIORITY - 1_000.0


# ---------------------------------------------------------------- the stage
@dataclass(frozen=True)
class _Relaxed:
    """A funnel relaxation as the decision reads it (from its task document: energies on the run type's scale)."""

    task_id: str
    energy_per_atom: float
    final_structure: Structure
    converged: bool
    n_steps: int
    max_force: float
    stopped: str | None = None  # a random start stopped after the first pass: why (amdflow.stages.random_search)


def _relaxed_from_task(task: dict[str, Any]) -> _Relaxed:
    return _Relaxed(task["task_id"], float(task["energy_per_atom"]), Structure.from_dict(task["final_structure"]),
                    bool(task["converged"]), int(task["n_steps"]), float(task["max_force"]),
                    (task.get("details") or {}).get("stopped_early"))


TASK_FIELDS = {"_id": 0, "task_id": 1, "energy_per_atom": 1, "final_structure": 1, "converged": 1, "n_steps": 1, "max_force": 1,
               "details.stopped_early": 1}


def _relax_batch(db: AmdflowDB, cfg: CampaignConfig, engine: Any, todo: list[dict[str, Any]], structures: list[Structure],
                 workers: int) -> tuple[list[Any], dict[str, str]]:
    """Relax the batch: substitution candidates in one pass; random-search starts in two (a short first pass, then
    only those within ``halving_margin`` of their composition's lowest go on), and none of a composition whose search
    has converged. Returns the results aligned with ``todo`` (a stopped start's is its first pass, with
    ``details['stopped_early']``; a start not relaxed has None) and, per candidate not relaxed, why."""
    from amdflow.relax import get_funnel_engine, relax_many
    from amdflow.relax.base import RelaxResult
    from amdflow.stages.random_search import (
        campaign_search,
        converged_reason,
        is_random,
        random_source,
        two_pass_relax,
    )

    source = random_source(cfg)
    rand = [i for i, d in enumerate(todo) if source is not None and is_random(d)]
    results: list[Any] = [None] * len(todo)
    plain = [i for i in range(len(todo)) if i not in set(rand)]
    if plain:
        for i, r in zip(plain, relax_many(engine, [structures[i] for i in plain], workers), strict=True):
            results[i] = r
    if not rand:
        return results, {}
    assert source is not None
    stats = campaign_search(db, cfg, [todo[i]["formula"] for i in rand])
    skipped = {todo[i]["candidate_id"]: converged_reason(stats[todo[i]["formula"]], source.stop_found)
               for i in rand if todo[i]["formula"] in stats and stats[todo[i]["formula"]].converged}
    rand = [i for i in rand if todo[i]["candidate_id"] not in skipped]
    if not rand:
        return results, skipped
    settings = get_settings()
    device = resolve_device(settings)
    first_steps = min(source.first_pass_steps, cfg.funnel.max_steps)
    short = get_funnel_engine(cfg.funnel.model_copy(update={"max_steps": first_steps}), device, settings.funnel_max_atoms)
    rest = get_funnel_engine(cfg.funnel.model_copy(update={"max_steps": max(cfg.funnel.max_steps - first_steps, 1)}),
                             device, settings.funnel_max_atoms)
    lowest = {f: s.lowest_energy_per_atom for f, s in stats.items() if s.lowest_energy_per_atom is not None}
    searched = {todo[i]["formula"] for i in rand}
    for i in plain:  # this batch's substitution candidates of the same formulas count as found minima too
        r = results[i]
        if todo[i]["formula"] in searched and isinstance(r, RelaxResult) and r.converged:
            try:
                e = task_doc("candidate", "peer", structures[i], r, engine, cfg, None).energy_per_atom
            except Exception:  # its own failure is reported by the stage; it sets no bar here
                continue
            lowest[todo[i]["formula"]] = min(lowest.get(todo[i]["formula"], e), e)

    def on_scale(i: int, r: Any) -> float:  # the run type's scale, as stored relaxations are: comparable with them
        return task_doc("candidate", "first-pass", structures[rand[i]], r, engine, cfg, None).energy_per_atom

    done = two_pass_relax([structures[i] for i in rand], [todo[i]["formula"] for i in rand], short, rest, on_scale,
                          lowest, source.halving_margin, workers)
    for i, r in zip(rand, done, strict=True):
        results[i] = r
    return results, skipped


def funnel_stage(db: AmdflowDB, candidate_ids: list[str], workers: int = 1) -> list[FunnelOutcome]:
    """Relax a batch of candidates with the funnel's potential, rebuild its hull, decide each one.

    ``workers``: processes for potentials without a batched path (CHGNet on CPU). A
    relaxation already stored (a batch killed after it, or one whose formula's claim timed
    out) is read back, not run again. A relaxation that fails is marked failed and returned
    with ``error``; one that trips the potential's guard passes on flagged ``ml_failed``.
    A formula whose claim cannot be had in time leaves only its own candidates undecided
    (``error``; their relaxations are kept for the rerun), never the batch's decided ones.
    """
    from amdflow.relax.guards import GuardTripped
    from amdflow.stages.random_search import is_random

    failpoint_delay("AMDFLOW_FAILPOINT_FUNNEL_DELAY_S")  # tests: a batch surely mid-run when killed
    docs = list(db.candidates.find({"candidate_id": {"$in": candidate_ids}},
                                   {"_id": 0, "candidate_id": 1, "campaign": 1, "formula": 1, "structure": 1, "prediction": 1,
                                    "template.source": 1}))
    found = {d["candidate_id"] for d in docs}
    missing = [c for c in candidate_ids if c not in found]
    if missing:
        raise AmdflowError(f"candidates {missing[:3]} are not in the database: re-add the campaign")
    outcomes: list[FunnelOutcome] = []
    by_campaign: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_campaign.setdefault(d["campaign"], []).append(d)
    for name, group in by_campaign.items():
        cfg, _ = load_campaign_config(db, name)
        if not cfg.funnel.enabled:
            raise AmdflowError(f"campaign '{name}' has no funnel (funnel.engine: none) but funnel Fireworks: "
                               "its settings changed after `amdflow add`; set funnel.engine again or re-add it")
        engine = funnel_engine(cfg)
        run_type = engine.run_type
        tids = {d["candidate_id"]: funnel_task_id(d["candidate_id"], run_type) for d in group}
        done = {t["task_id"]: _relaxed_from_task(t) for t in db.tasks.find({"task_id": {"$in": sorted(tids.values())}}, TASK_FIELDS)}
        todo = [d for d in group if tids[d["candidate_id"]] not in done]
        structures = [Structure.from_dict(d["structure"]) for d in todo]
        results, not_relaxed = _relax_batch(db, cfg, engine, todo, structures, workers) if todo else ([], {})
        tasks, ml_failed = [], []
        for d, s, r in zip(todo, structures, results, strict=True):
            cid, tid = d["candidate_id"], tids[d["candidate_id"]]
            if cid in not_relaxed:  # a random start of a composition whose search has converged
                outcomes.append(_cut_unrelaxed(db, cfg, engine, cid, not_relaxed[cid]))
                continue
            if isinstance(r, GuardTripped):
                if is_random(d):
                    outcomes.append(_cut_hole(db, cfg, engine, cid, str(r)))
                else:
                    ml_failed.append((d, str(r)))
                continue
            try:
                if isinstance(r, BaseException):
                    raise r
                task = task_doc("candidate", tid, s, r, engine, cfg, None, cid, name, level=LEVEL,
                                settings=cfg.funnel.model_dump(mode="json"))
            except Exception as err:  # one candidate's failure is its own (a relaxation error, a CorrectionError)
                record_failure(db, cid, "funnel", err)
                outcomes.append(FunnelOutcome(cid, False, error=f"{type(err).__name__}: {err}"))
                continue
            tasks.append(ReplaceOne({"task_id": tid}, task.to_mongo(), upsert=True))
            done[tid] = _Relaxed(tid, task.energy_per_atom, r.final_structure, r.converged, r.n_steps, r.max_force,
                                 r.details.get("stopped_early"))
        bulk_write(db.tasks, tasks)
        refresh_funnel_hull(db, cfg, run_type)
        by_formula: dict[str, list[tuple[dict[str, Any], _Relaxed]]] = {}
        for d in group:
            if tids[d["candidate_id"]] in done:
                by_formula.setdefault(d["formula"], []).append((d, done[tids[d["candidate_id"]]]))
        for formula, items in sorted(by_formula.items()):
            decided: set[str] = set()
            try:
                with claim(db, f"funnel:{name}:{formula}", timeout_s=FORMULA_CLAIM_TIMEOUT_S):
                    failpoint_delay("AMDFLOW_FAILPOINT_FUNNEL_DECIDE_DELAY_S")  # tests: a decision held open under the claim
                    for d, r in sorted(items, key=lambda it: (it[1].energy_per_atom, it[0]["candidate_id"])):
                        outcomes.append(_decide(db, cfg, engine, d["candidate_id"], formula, r, is_random(d)))
                        decided.add(d["candidate_id"])
            except ClaimTimeout as err:  # the decided ones stand; the rest wait for a rerun (their relaxations are kept)
                for d, _ in items:
                    if d["candidate_id"] not in decided:
                        outcomes.append(FunnelOutcome(d["candidate_id"], False, error=f"{err}: its ML relaxation is kept, "
                                                      "`amdflow rerun CAMPAIGN --fizzled` decides it"))
        for d, reason in ml_failed:
            outcomes.append(_pass_ml_failed(db, cfg, engine, d["candidate_id"], reason))
    return outcomes


def _cut_unrelaxed(db: AmdflowDB, cfg: CampaignConfig, engine: Any, candidate_id: str, reason: str) -> FunnelOutcome:
    """A random start the search's stop rule leaves unrelaxed: cut, with no ML energy and the reason."""
    record = FunnelRecord(engine=engine.name, model=_model_label(engine), run_type=engine.run_type, task_id=None,
                          energy_per_atom=None, converged=False, n_steps=0, max_force=None,
                          max_e_above_hull=cfg.funnel.max_e_above_hull, passed=False, reason=reason)
    set_state(db, candidate_id, CandidateState.FUNNEL_CUT, funnel=record.to_mongo(), error=None)
    return FunnelOutcome(candidate_id, False, reason=reason)


def _cut_hole(db: AmdflowDB, cfg: CampaignConfig, engine: Any, candidate_id: str, seen: str) -> FunnelOutcome:
    """A random start whose relaxation fell into a hole of the potential: cut (one draw of many), with what was seen."""
    reason = f"random search: the start fell into a hole of the potential ({seen[:300]}): cut, the other starts stand for it"
    record = FunnelRecord(engine=engine.name, model=_model_label(engine), run_type=engine.run_type, task_id=None,
                          energy_per_atom=None, converged=False, n_steps=0, max_force=None,
                          max_e_above_hull=cfg.funnel.max_e_above_hull, passed=False, hole=True, ml_error=seen[:500],
                          reason=reason)
    set_state(db, candidate_id, CandidateState.FUNNEL_CUT, funnel=record.to_mongo(), error=None)
    return FunnelOutcome(candidate_id, False, reason=reason)


def hole_reason(formation_energy: float, run_type: str) -> str:
    from amdflow.thermo.hull import FORMATION_ENERGY_FLOOR

    return (f"formation energy {formation_energy:.2f} eV/atom on the {run_type} hull, below the floor "
            f"{FORMATION_ENERGY_FLOOR} eV/atom of any real compound: the potential has a hole here")


def _pass_ml_failed(db: AmdflowDB, cfg: CampaignConfig, engine: Any, candidate_id: str, reason: str) -> FunnelOutcome:
    """A candidate whose ML relaxation tripped the guard: passed on, flagged, with no place on the ML hull."""
    record = FunnelRecord(engine=engine.name, model=_model_label(engine), run_type=engine.run_type, task_id=None,
                          energy_per_atom=None, converged=False, n_steps=0, max_force=None,
                          max_e_above_hull=cfg.funnel.max_e_above_hull, passed=True, ml_failed=True, ml_error=reason[:500],
                          reason=None)
    set_state(db, candidate_id, CandidateState.PRERELAXED, funnel=record.to_mongo(), error=None)
    logger.info("candidate %s: the funnel's potential tripped its guard (%s): passed on, flagged ml_failed", candidate_id, reason)
    return FunnelOutcome(candidate_id, True, ml_failed=True)


def _decide(db: AmdflowDB, cfg: CampaignConfig, engine: Any, candidate_id: str, formula: str, result: _Relaxed,
            random: bool = False) -> FunnelOutcome:
    """Second dedup, ML hull position and rank, cut: one candidate, inside its formula's claim (every read made here).
    A formation energy below the hull's floor is a hole: a random start is cut, any other candidate passed on
    ``ml_failed``."""
    from amdflow.thermo.hull import FORMATION_ENERGY_FLOOR

    energy = result.energy_per_atom
    task_id = result.task_id
    thermo = _ml_thermo(db, cfg, engine.run_type, [task_id]).get(task_id)
    e_form = None if thermo is None else thermo["formation_energy_per_atom"]
    if e_form is not None and e_form < FORMATION_ENERGY_FLOOR:
        seen = hole_reason(e_form, engine.run_type)
        return _cut_hole(db, cfg, engine, candidate_id, seen) if random else _pass_ml_failed(db, cfg, engine, candidate_id, seen)
    peers = _kept_peers(db, cfg.name, formula, candidate_id, engine.run_type)
    dup, demoted = _second_dedup(db, cfg, candidate_id, energy, result.final_structure, peers)
    e_hull = None if thermo is None else thermo["e_above_hull"]
    alive = [p for p in peers if p["candidate_id"] not in demoted]
    rank = 1 + sum((p["funnel"]["energy_per_atom"], p["candidate_id"]) < (energy, candidate_id) for p in alive)
    reason = result.stopped or _cut_reason(cfg, engine.run_type, e_hull, rank)
    if dup is not None:
        reason = f"funnel: relaxed into the same crystal as {dup} (lower ML energy on the {engine.run_type} hull)"
    record = FunnelRecord(
        engine=engine.name, model=_model_label(engine), run_type=engine.run_type, task_id=task_id, energy_per_atom=energy,
        converged=result.converged, n_steps=result.n_steps, max_force=result.max_force,
        formation_energy_per_atom=None if thermo is None else thermo["formation_energy_per_atom"], e_above_hull=e_hull,
        max_e_above_hull=cfg.funnel.max_e_above_hull, rank=rank, passed=reason is None, deferred=e_hull is None and dup is None,
        duplicate_of=dup, reason=reason, stopped_early=bool(result.stopped),
    )
    state = (CandidateState.DUPLICATE if dup else CandidateState.PRERELAXED if reason is None else CandidateState.FUNNEL_CUT)
    set_state(db, candidate_id, state, funnel=record.to_mongo(), error=None)
    return FunnelOutcome(candidate_id, reason is None, e_hull, reason, dup, record.deferred)


def _model_label(engine: Any) -> str:
    from amdflow.campaign import SEVENNET_MODELS

    if engine.name == "sevennet":
        return SEVENNET_MODELS.get(engine.model_name, engine.model_name)
    return "CHGNet"


def _cut_reason(cfg: CampaignConfig, run_type: str, e_hull: float | None, rank: int | None) -> str | None:
    cut, top_k = cfg.funnel.max_e_above_hull, cfg.funnel.top_k_per_formula
    if e_hull is not None and e_hull > cut:
        return f"funnel: e_above_hull {e_hull:.3f} > {cut} on the {run_type} hull"
    if top_k is not None and rank is not None and rank > top_k:
        return f"funnel: ML energy rank {rank} of its formula; top_k_per_formula is {top_k}"
    return None


def _kept_peers(db: AmdflowDB, campaign: str, formula: str, candidate_id: str, run_type: str) -> list[dict[str, Any]]:
    """The formula's other candidates relaxed by this potential and kept (passed, cut or over budget; not duplicates,
    not ``ml_failed``: those have no ML energy)."""
    return [p for p in db.candidates.find(
        {"campaign": campaign, "formula": formula, "candidate_id": {"$ne": candidate_id}, "funnel.run_type": run_type,
         "funnel.duplicate_of": None, "state": {"$in": list(KEPT_AFTER_FUNNEL)}},
        {"_id": 0, "candidate_id": 1, "state": 1, "funnel": 1, "relax_started_at": 1})
        if not p["funnel"].get("ml_failed") and p["funnel"].get("energy_per_atom") is not None]


def final_relax_started(peer: dict[str, Any]) -> bool:
    """Whether a candidate's final relaxation has started or finished (a check that merely ran does not count)."""
    return peer.get("state") in (CandidateState.RELAXED.value, CandidateState.ANALYZED.value) or bool(peer.get("relax_started_at"))


def _second_dedup(db: AmdflowDB, cfg: CampaignConfig, candidate_id: str, energy: float, structure: Structure,
                  peers: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """(the kept peer this relaxed candidate duplicates or None, the peers it beat and made its duplicates)."""
    if not peers:
        return None, []
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(ltol=cfg.dedup.ltol, stol=cfg.dedup.stol, angle_tol=cfg.dedup.angle_tol)
    finals = {t["task_id"]: Structure.from_dict(t["final_structure"]) for t in db.tasks.find(
        {"task_id": {"$in": [p["funnel"]["task_id"] for p in peers]}}, {"_id": 0, "task_id": 1, "final_structure": 1})}
    demote = []
    for p in sorted(peers, key=lambda p: (p["funnel"]["energy_per_atom"], p["candidate_id"])):
        other = finals.get(p["funnel"]["task_id"])
        if other is None or not matcher.fit(structure, other):
            continue
        if final_relax_started(p) or (p["funnel"]["energy_per_atom"], p["candidate_id"]) < (energy, candidate_id):
            return str(p["candidate_id"]), []
        demote.append(p["candidate_id"])
    for other_id in demote:  # this candidate is the lower-energy member: the others wait for nothing
        reason = f"funnel: relaxed into the same crystal as {candidate_id} (lower ML energy)"
        db.candidates.update_one({"candidate_id": other_id, "state": {"$in": list(DEMOTABLE)}, "relax_started_at": None},
                                 {"$set": {"state": CandidateState.DUPLICATE.value, "updated_at": utcnow(),
                                           "funnel.duplicate_of": candidate_id, "funnel.passed": False, "funnel.reason": reason}})
    return None, demote


def _ml_thermo(db: AmdflowDB, cfg: CampaignConfig, run_type: str, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    return {t["material_id"]: t for t in db.thermo.find(
        {"material_id": {"$in": task_ids}, "hull_chemsys": cfg.chemsys, "run_type": run_type},
        {"_id": 0, "material_id": 1, "e_above_hull": 1, "formation_energy_per_atom": 1})}


# ---------------------------------------------------------------- the ML hull
def refresh_funnel_hull(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> int:
    """Build the funnel's hull (incremental: nothing when nothing changed); follow it on waiting candidates.

    Candidates whose ML hull position changed get it on their funnel record, and their
    relax Firework, while it waits, the matching ``_priority``. Returns the changed count.
    """
    from amdflow.builders.thermo import ThermoBuilder, run_builder

    builder = ThermoBuilder.from_db(db, run_types=[run_type], chemsys=[cfg.chemsys],
                                    include_unconverged=cfg.analyze.include_unconverged)
    with claim(db, f"hull:{run_type}:{cfg.chemsys}", stale_s=HULL_CLAIM_STALE_S):
        run_builder(builder)
    changed = {d["candidate_id"]: d for d in builder.changed
               if d.get("candidate_id") and d.get("campaign") == cfg.name and d["hull_chemsys"] == cfg.chemsys}
    if not changed:
        return 0
    ops, relax_fws = [], {}
    for c in db.candidates.find({"candidate_id": {"$in": sorted(changed)}, "funnel.run_type": run_type},
                                {"candidate_id": 1, "fw_ids": 1, "state": 1}):
        t = changed[c["candidate_id"]]
        ops.append(UpdateOne({"candidate_id": c["candidate_id"]}, {"$set": {
            "funnel.e_above_hull": t["e_above_hull"], "funnel.formation_energy_per_atom": t["formation_energy_per_atom"]}}))
        if c["state"] == CandidateState.PRERELAXED.value and (c.get("fw_ids") or {}).get("relax"):
            relax_fws[c["fw_ids"]["relax"]] = priority_from_e_above_hull(t["e_above_hull"])
    bulk_write(db.candidates, ops)
    bulk_write(db.launchpad.fireworks, [UpdateOne({"fw_id": fw_id, "state": {"$in": ["WAITING", "READY"]}},
                                                  {"$set": {"spec._priority": p}}) for fw_id, p in relax_fws.items()])
    return len(changed)


def funnel_hull_stage(db: AmdflowDB, campaign: str) -> dict[str, Any]:
    """The funnel-level analyze step (after the potential's references or known phases): rebuild its hull."""
    cfg, _ = load_campaign_config(db, campaign)
    run_type = funnel_engine(cfg).run_type
    changed = refresh_funnel_hull(db, cfg, run_type)
    q = {"hull_chemsys": cfg.chemsys, "run_type": run_type}
    return {"run_type": run_type, "thermo": db.thermo.count_documents(q), "changed": changed}


# ---------------------------------------------------------------- the check before the final relax
def check_before_relax(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any],
                       start: Callable[[dict[str, Any]], None] | None = None) -> Structure | None:
    """The funnel's decision again, on the hull as it stands, just before the final relax starts.

    Everything is read again inside the formula's claim (a twin decided meanwhile may have
    made this candidate its duplicate), and ``start`` (the relax stage's budget slot) runs
    there too, after which the candidate is marked started (``relax_started_at``): from then
    on no twin can demote it. Returns the funnel's relaxed structure (where the final relax
    starts), or None when the candidate never went through the funnel or its ML relaxation
    failed (``ml_failed``: it starts from its own cell). Raises :class:`FunnelCut` when it is
    now outside the cut or a duplicate (its state and reason are recorded), and
    :class:`AmdflowError` when the funnel's hull still has no place for it.
    """
    if not doc.get("funnel"):
        if start is not None:
            start(doc)
        return None
    cid = doc["candidate_id"]
    run_type = doc["funnel"]["run_type"]
    if not doc["funnel"].get("ml_failed") and not doc["funnel"].get("duplicate_of"):
        refresh_funnel_hull(db, cfg, run_type)
    with claim(db, f"funnel:{cfg.name}:{doc['formula']}"):
        current = db.candidates.find_one({"candidate_id": cid}, {"_id": 0})
        if current is None:
            raise AmdflowError(f"candidate {cid} is not in the database: was it deleted? re-add the campaign")
        record = current.get("funnel") or {}
        if record.get("duplicate_of") or current.get("state") == CandidateState.DUPLICATE.value:
            raise FunnelCut(record.get("reason") or f"funnel: relaxed into the same crystal as {record.get('duplicate_of')}")
        if record.get("ml_failed"):
            if start is not None:
                start(current)
            db.candidates.update_one({"candidate_id": cid}, {"$set": {"relax_started_at": utcnow()}})
            return None
        thermo = _ml_thermo(db, cfg, run_type, [record["task_id"]]).get(record["task_id"])
        if thermo is None:
            raise AmdflowError(f"candidate {cid}: no place on the funnel's {run_type} hull of {cfg.chemsys} yet: its elemental "
                               "references at the funnel level are not relaxed (FIZZLED or not run): run them, then "
                               "`amdflow rerun CAMPAIGN --fizzled`")
        peers = _kept_peers(db, cfg.name, current["formula"], cid, run_type)
        rank = 1 + sum((p["funnel"]["energy_per_atom"], p["candidate_id"]) < (record["energy_per_atom"], cid) for p in peers)
        reason = _cut_reason(cfg, run_type, thermo["e_above_hull"], rank)
        check = {"e_above_hull": thermo["e_above_hull"], "rank": rank, "max_e_above_hull": cfg.funnel.max_e_above_hull,
                 "passed": reason is None, "at": utcnow()}
        fields: dict[str, Any] = {"funnel.checked_at_relax": check, "funnel.e_above_hull": thermo["e_above_hull"],
                                  "funnel.formation_energy_per_atom": thermo["formation_energy_per_atom"], "funnel.rank": rank}
        if reason is not None:
            reason = f"{reason} (checked before the final relax)"
            set_state(db, cid, CandidateState.FUNNEL_CUT, **fields, **{"funnel.passed": False, "funnel.reason": reason})
            raise FunnelCut(reason)
        db.candidates.update_one({"candidate_id": cid}, {"$set": fields})
        if start is not None:
            start(current)  # may raise OverBudget: then not started
        db.candidates.update_one({"candidate_id": cid}, {"$set": {"relax_started_at": utcnow()}})
    task = db.tasks.find_one({"task_id": record["task_id"]}, {"final_structure": 1})
    if task is None:
        raise AmdflowError(f"candidate {cid}: the funnel's task {record['task_id']} is missing: rerun its funnel Firework")
    return Structure.from_dict(task["final_structure"])


# ---------------------------------------------------------------- a changed cut
def decide_again(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The funnel's decision for a relaxed candidate under ``cfg``'s cut, on the hull as it stands (no relaxation).

    Returns (reason it is cut, or None when it passes; the record fields to store).
    """
    record = doc["funnel"]
    cid = doc["candidate_id"]
    thermo = _ml_thermo(db, cfg, record["run_type"], [record["task_id"]]).get(record["task_id"])
    e_hull = None if thermo is None else thermo["e_above_hull"]
    peers = _kept_peers(db, cfg.name, doc["formula"], cid, record["run_type"])
    rank = 1 + sum((p["funnel"]["energy_per_atom"], p["candidate_id"]) < (record["energy_per_atom"], cid) for p in peers)
    reason = _cut_reason(cfg, record["run_type"], e_hull, rank)
    fields = {"funnel.e_above_hull": e_hull, "funnel.rank": rank, "funnel.max_e_above_hull": cfg.funnel.max_e_above_hull,
              "funnel.passed": reason is None, "funnel.reason": reason, "funnel.deferred": e_hull is None}
    return reason, fields
