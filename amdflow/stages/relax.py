"""Relax: candidates and elemental references with the campaign's engine; task documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB
from amdflow.errors import AmdflowError
from amdflow.schemas import CandidateState, ReferenceDoc, utcnow
from amdflow.settings import get_settings, resolve_device
from amdflow.stages.common import load_campaign_config, load_candidate, set_state
from amdflow.stages.tasks import task_doc


class OverBudget(Exception):
    """The relax stage's check: the campaign's relax budget is spent (the candidate waits; message says how many)."""


def take_budget_slot(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any]) -> None:
    """Count this candidate's relaxation against ``relax.budget``, or raise :class:`OverBudget` and mark it over_budget.

    The count is one atomic conditional increment on the campaign document, so parallel
    rockets never start more than the budget; with ``rounds:`` the increment also checks the open round's share, and
    the candidate records its round (:func:`amdflow.stages.rounds.take_slot`). A candidate keeps its slot (``budget_slot``):
    a rerun of its relaxation (fizzled, lost, walltime) does not count twice. A rocket killed
    between the increment and the mark leaves one slot counted but unused: the budget errs
    towards fewer relaxations, never more.
    """
    if doc.get("budget_slot"):
        return
    from amdflow.stages.rounds import take_slot

    taken, k, why = take_slot(db, cfg)  # with rounds: the open round's share too (amdflow.stages.rounds)
    if not taken:
        set_state(db, doc["candidate_id"], CandidateState.OVER_BUDGET)
        raise OverBudget(why)
    db.candidates.update_one({"candidate_id": doc["candidate_id"]},
                             {"$set": {"budget_slot": True, **({} if k is None else {"round": k})}})


def relax_candidate_stage(db: AmdflowDB, candidate_id: str, directory: Path | None = None, env: dict[str, Any] | None = None) -> str:
    """Relax a candidate with the campaign's engine; writes a task doc, returns its id. ``env``: the FWorker's env."""
    from amdflow.relax import get_engine
    from amdflow.relax.base import WalltimeStop

    doc = load_candidate(db, candidate_id)
    cfg, _ = load_campaign_config(db, doc["campaign"])
    engine = get_engine(cfg.relax, resolve_device(get_settings()), env)
    structure = Structure.from_dict(doc["structure"])
    if cfg.funnel.enabled:  # the funnel's decision again on its hull as it stands (raises FunnelCut), then the budget
        from amdflow.stages.funnel import check_before_relax

        # the final relax starts from the ML-relaxed cell; the budget slot (raises OverBudget) is taken inside the check
        structure = check_before_relax(db, cfg, doc, start=lambda current: take_budget_slot(db, cfg, current)) or structure
    else:
        take_budget_slot(db, cfg, doc)  # raises OverBudget when the allocation is spent
        db.candidates.update_one({"candidate_id": candidate_id}, {"$set": {"relax_started_at": utcnow()}})
    resume = doc.get("resume") or {}
    start = Structure.from_dict(resume["structure"]) if resume.get("structure") else structure
    try:
        result = engine.relax(start, directory)
    except WalltimeStop as stop:  # keep the last structure: the rerun continues from it
        db.candidates.update_one({"candidate_id": candidate_id}, {"$set": {"resume": {
            "structure": stop.structure.as_dict(), "dir": str(stop.directory), "at": utcnow()}}})
        raise
    if resume:
        result.details["resumed_from"] = resume.get("dir")
    task_id = f"{candidate_id}-{engine.name}"
    k = (db.candidates.find_one({"candidate_id": candidate_id}, {"round": 1}) or {}).get("round")
    task = task_doc("candidate", task_id, structure, result, engine, cfg, directory, candidate_id, doc["campaign"],
                    **({} if k is None else {"round": k}))
    db.tasks.replace_one({"task_id": task_id}, task.to_mongo(), upsert=True)
    set_state(db, candidate_id, CandidateState.RELAXED, task_id=task_id, error=None)
    if resume:
        db.candidates.update_one({"candidate_id": candidate_id}, {"$unset": {"resume": ""}})
    return task_id


def reference_id(element: str, prototype: str, run_type: str) -> str:
    return f"ref-{element}-{prototype}-{run_type}"


def reference_structure(element: str, prototype: str) -> Structure:
    """An elemental reference structure: the element's shipped ground state (``ground_state``), or an AFLOW
    elemental prototype with ``element``, scaled to its atomic volume.

    ``prototype`` is 'ground_state', a one-element AFLOW label or a short name (fcc, bcc, ...):
    reference Fireworks added before short names were normalised carry the short name.
    """
    from amdflow.campaign import elemental_prototype_label
    from amdflow.generate.substitute import substitute
    from amdflow.generate.templates import aflow_structure
    from amdflow.thermo.ground_states import GROUND_STATE, ground_state_structure

    if prototype == GROUND_STATE:
        return ground_state_structure(element)
    try:
        label = elemental_prototype_label(prototype)
    except ValueError as err:
        raise AmdflowError(f"elemental reference of {element}: {err}") from None
    s = aflow_structure(label)
    return substitute(s, {s[0].specie.symbol: element}, scale_volume=True)


def reference_name(element: str, prototype: str) -> str:
    """How a reference structure is named for people: 'alpha-B (R-3m) [ground state; MP mp-160]', 'fcc (A_cF4_225_a)'."""
    from amdflow.campaign import REFERENCE_PROTOTYPES
    from amdflow.thermo.ground_states import GROUND_STATE, ground_state_label

    if prototype == GROUND_STATE:
        return ground_state_label(element)
    short = {v: k for k, v in REFERENCE_PROTOTYPES.items()}.get(prototype)
    return f"{short} ({prototype})" if short else prototype


#: Where a reference whose relaxation trips the potential's guard falls back to when the element has no other
#: reference structure of its own (each configured structure is relaxed by its own Firework).
REFERENCE_FALLBACKS = ("A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c")


def level_engine(cfg: CampaignConfig, level: str, env: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(engine, settings) of a relaxation level: 'final' the campaign's relax engine, 'funnel' the funnel's potential."""
    from amdflow.relax import get_engine, get_funnel_engine

    device = resolve_device(get_settings())
    if level == "funnel":
        return get_funnel_engine(cfg.funnel, device), cfg.funnel.model_dump(mode="json")
    if level != "final":
        raise AmdflowError(f"unknown relaxation level '{level}': 'final' or 'funnel'")
    return get_engine(cfg.relax, device, env), cfg.relax.model_dump(mode="json")


def relax_reference_stage(db: AmdflowDB, campaign: str, element: str, prototype: str, env: dict[str, Any] | None = None,
                          level: str = "final") -> str:
    """Relax one elemental reference phase the way candidates are relaxed at ``level`` (same engine, same settings).

    A relaxation that trips the potential's guard (a collapse: the potential's hole, not the element's ground
    state) is no reference. When the element has other reference structures, they decide (the lowest wins) and
    this one is recorded as failed; when it has none, the next of :data:`REFERENCE_FALLBACKS` is relaxed in its
    place, and the reference doc and task say so. Returns the reference id.
    """
    from amdflow.relax.guards import GuardTripped

    cfg, _ = load_campaign_config(db, campaign)
    engine, settings = level_engine(cfg, level, env)
    ref_id = reference_id(element, prototype, engine.run_type)
    own = [p for p in cfg.relax.element_reference_structures(element) if p != prototype]
    tried: list[dict[str, str]] = []
    for used in [prototype, *([] if own else [p for p in REFERENCE_FALLBACKS if p != prototype])]:
        structure = reference_structure(element, used)
        try:
            result = engine.relax(structure)
        except GuardTripped as err:
            tried.append({"structure": used, "name": reference_name(element, used), "reason": str(err)})
            continue
        break
    else:
        why = "; ".join(f"{t['name']}: {t['reason']}" for t in tried)
        db.references.update_one({"ref_id": ref_id}, {"$set": {"state": "failed", "error": why[:1000], "tried": tried}})
        if own:  # the element's other structures decide; the analyze step runs on
            return ref_id
        raise AmdflowError(f"every reference structure of {element} ({engine.run_type}) tripped the potential's guard: {why}"
                           "; add relax.reference_prototypes another structure can relax")
    reference = {"element": element, "prototype": prototype, "structure": used, "name": reference_name(element, used),
                 "fallback_from": tried or None}
    task = task_doc("reference", ref_id, structure, result, engine, cfg, None, None, None, settings=settings, level=level,
                    reference=reference)
    db.tasks.replace_one({"task_id": ref_id}, task.to_mongo(), upsert=True)
    db.references.update_one(
        {"ref_id": ref_id},
        {"$set": {"state": "relaxed", "energy_per_atom": task.energy_per_atom, "task_id": ref_id, "structure": used,
                  "name": reference["name"], "tried": tried or None, "error": None}},
    )
    return ref_id


def chosen_references(db: AmdflowDB, run_type: str, elements: list[str]) -> dict[str, dict[str, Any]]:
    """Per element, the reference that sets its energy on the ``run_type`` hull: the lowest energy per atom among its
    relaxed reference tasks (converged ones first, as the hull takes them). Elements not relaxed yet are absent.

    Each value: ``name`` (for people, e.g. 'graphite (P6_3/mmc) [ground state; MP mp-48]'), ``structure`` (what was
    relaxed), ``energy_per_atom`` (eV/atom, on the run type's scale), ``task_id``, ``converged``, ``fallback_from``.
    """
    best: dict[str, dict[str, Any]] = {}
    # the references collection by (run_type, element), then their tasks by id: both reads on an index
    refs = [d for d in db.references.find({"run_type": run_type, "element": {"$in": list(elements)}},
                                          {"_id": 0, "ref_id": 1, "element": 1, "prototype": 1, "state": 1})
            if d.get("state") == "relaxed"]
    fields = {"_id": 0, "task_id": 1, "chemsys": 1, "energy_per_atom": 1, "converged": 1, "reference": 1}
    tasks = {t["task_id"]: t for t in db.tasks.find({"task_id": {"$in": [d["ref_id"] for d in refs]}}, fields)}
    for d in refs:
        t = tasks.get(d["ref_id"])
        if t is None:
            continue
        el = d["element"]
        ref = t.get("reference") or {}
        used = ref.get("structure") or d["prototype"]  # tasks older than 'reference': what the doc says
        row = {"name": ref.get("name") or reference_name(el, used), "structure": used, "energy_per_atom": t["energy_per_atom"],
               "task_id": t["task_id"], "converged": bool(t.get("converged")), "fallback_from": ref.get("fallback_from")}
        key = (not row["converged"], row["energy_per_atom"])
        if el not in best or key < (not best[el]["converged"], best[el]["energy_per_atom"]):
            best[el] = row
    return {el: best[el] for el in elements if el in best}


def pending_references(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> list[ReferenceDoc]:
    """Reference docs this campaign needs that are not in the database yet."""
    wanted = [
        ReferenceDoc(ref_id=reference_id(el, proto, run_type), element=el, prototype=proto, run_type=run_type)
        for el in sorted(cfg.elements)
        for proto in cfg.relax.element_reference_structures(el)
    ]
    have = {d["ref_id"] for d in db.references.find({"ref_id": {"$in": [w.ref_id for w in wanted]}}, {"ref_id": 1})}
    return [w for w in wanted if w.ref_id not in have]
