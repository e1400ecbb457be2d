"""Campaign operations behind the CLI: add, run, status, rerun, refresh outputs."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB
from amdflow.errors import AmdflowError
from amdflow.generate import GenerateReport, generate_candidates
from amdflow.schemas import CandidateState, utcnow

logger = logging.getLogger(__name__)

INSERT_BATCH = 1000
DONE_STATES = ("COMPLETED", "DEFUSED", "FIZZLED")
Progress = Callable[[int, int, str], None]  # (done, total, what) -> None


@dataclass
class AddReport:
    """What `amdflow add` did."""

    generated: int = 0
    new_candidates: int = 0
    new_workflows: int = 0
    new_reference_workflows: int = 0
    known: dict[str, Any] = field(default_factory=dict)
    templates_read: int = 0
    templates_skipped: list[tuple[str, str]] = field(default_factory=list)
    generate: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated": self.generated, "new_candidates": self.new_candidates, "new_workflows": self.new_workflows,
            "new_reference_workflows": self.new_reference_workflows, "known": self.known, "templates_read": self.templates_read,
            "templates_skipped": len(self.templates_skipped), "generate": self.generate,
        }


def _batches(iterable: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in iterable:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def register_campaign(db: AmdflowDB, cfg: CampaignConfig, allow_changed: bool = False) -> dict[str, Any]:
    """Insert the campaign doc, or check the stored one has the same settings."""
    from amdflow.stages import campaign_doc

    doc = campaign_doc(cfg)
    stored = db.campaigns.find_one({"name": cfg.name}, {"_id": 0})
    if stored is None:
        db.campaigns.insert_one(doc.to_mongo())
        return doc.to_mongo()
    if stored["config_hash"] != doc.config_hash and _same_settings_renormalised(stored, doc.config_hash):
        # stored by an amdflow that left a default unnormalised (e.g. reference_prototypes
        # 'fcc'): the same settings, so the stored config takes today's normal form
        db.campaigns.update_one({"name": cfg.name}, {"$set": {"config": doc.config, "config_hash": doc.config_hash, "updated_at": utcnow()}})
    elif stored["config_hash"] != doc.config_hash:
        if not allow_changed:
            raise AmdflowError(
                f"campaign '{cfg.name}' exists with different settings (stored {stored['config_hash'][:12]}, "
                f"file {doc.config_hash[:12]}): use a new campaign name, or pass --allow-changed-settings "
                "(Fireworks not yet run will use the new settings)"
            )
        db.campaigns.update_one({"name": cfg.name}, {"$set": {"config": doc.config, "config_hash": doc.config_hash, "updated_at": utcnow()}})
    elif stored["config"].get("templates") != doc.config.get("templates"):
        # the same settings, a random search of another size (n_structures is outside the hash): the stored sources follow
        db.campaigns.update_one({"name": cfg.name}, {"$set": {"config.templates": doc.config["templates"], "updated_at": utcnow()}})
    if stored["config"].get("rounds") != doc.config.get("rounds"):
        # the rounds are outside the hash (how the budget is spent over time): the file's stand from now on
        db.campaigns.update_one({"name": cfg.name}, {"$set": {"config.rounds": doc.config.get("rounds"), "updated_at": utcnow()}})
    now_types = {"run_type": doc.run_type, "funnel_run_type": doc.funnel_run_type}
    if stored.get("funnel_checkpoint"):  # a round's fine-tuned potential is the funnel's: its run type stands
        now_types["funnel_run_type"] = stored.get("funnel_run_type")
    if any(stored.get(k) != v for k, v in now_types.items()):
        # this amdflow names run types differently (their correction scheme, every energy-relevant setting): results
        # stored under the old ones stay apart, and the references of the new ones are added by this add
        logger.warning("campaign %s: run types %s -> %s; tasks of the old run types stay on their own hulls", cfg.name,
                       {k: stored.get(k) for k in now_types}, now_types)
        db.campaigns.update_one({"name": cfg.name}, {"$set": {**now_types, "updated_at": utcnow()}})
    return db.campaigns.find_one({"name": cfg.name}, {"_id": 0})


def _same_settings_renormalised(stored: dict[str, Any], config_hash: str) -> bool:
    """True when the stored config, validated again by this amdflow, has ``config_hash``."""
    from amdflow.campaign import stored_campaign_from_dict
    from amdflow.errors import ConfigError

    try:
        return stored_campaign_from_dict(stored["config"]).config_hash() == config_hash
    except ConfigError:
        return False


def insert_candidates(db: AmdflowDB, cfg: CampaignConfig, report: AddReport, progress: Progress | None = None,
                      workers: int | None = None) -> GenerateReport:
    """Generate and bulk-insert candidate docs (unordered; existing ids are skipped)."""
    from pymongo.errors import BulkWriteError

    gen = GenerateReport()
    # MongoDB takes raw BSON as built; mongomock needs plain dicts.
    raw = not type(db.candidates).__module__.startswith("mongomock")
    for batch in _batches(generate_candidates(cfg, gen, workers=workers, progress=progress, raw=raw), INSERT_BATCH):
        ids = list({d["candidate_id"]: None for d in batch})
        have = {d["candidate_id"] for d in db.candidates.find({"candidate_id": {"$in": ids}}, {"candidate_id": 1})}
        unique = {d["candidate_id"]: d for d in batch if d["candidate_id"] not in have}
        if unique:
            try:
                db.candidates.insert_many(list(unique.values()), ordered=False)
                report.new_candidates += len(unique)
            except BulkWriteError as err:  # a concurrent add inserted some of them
                report.new_candidates += err.details.get("nInserted", 0)
        report.generated += len(batch)
    report.templates_read = gen.templates.read
    report.templates_skipped = gen.templates.skipped
    report.generate = gen.as_dict()
    return gen


def plan_campaign(cfg: CampaignConfig, workers: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Dry run: what generation would read, skip and make, and the database size it needs.

    Documents are built and measured (BSON) but not stored; the workflow size is that of
    one candidate workflow's Firework and workflow documents, times the candidate count.
    """
    import bson

    from amdflow.campaign import RandomTemplates
    from amdflow.generate.random_search import random_compositions
    from amdflow.workflows import candidate_workflow

    gen = GenerateReport()
    candidate_bytes = 0
    # a random search is counted, not run: pyxtal takes ~0.3 s a structure (BENCHMARKS.md), too long for a plan
    randoms = [t for t in cfg.templates if isinstance(t, RandomTemplates)]
    others = [t for t in cfg.templates if not isinstance(t, RandomTemplates)]
    if others:
        for doc in generate_candidates(cfg.model_copy(update={"templates": others}), gen, workers=workers,
                                       progress=progress, raw=True):
            candidate_bytes += len(doc.raw)
    searched = []
    for t in randoms:
        comps = random_compositions(cfg.elements, t, cfg.generate.include_subsystems)
        searched.append({"compositions": len(comps), "n_structures": t.n_structures, "max_atoms": t.max_atoms,
                         "structures": len(comps) * t.n_structures})
        gen.stats.candidates += len(comps) * t.n_structures  # at most: structures pyxtal cannot place are skipped
        candidate_bytes += len(comps) * t.n_structures * (700 + 130 * t.max_atoms)  # measured: ~1.6 KB at 8 atoms
    wf = candidate_workflow("0" * 24, cfg.name, "AB", funnel=cfg.funnel.enabled)
    wf_bytes = len(bson.encode(wf.to_db_dict())) + sum(len(bson.encode(fw.to_db_dict())) for fw in wf.fws)
    plan = gen.as_dict()
    plan["random"] = searched
    plan["skipped"] = [{"template": t, "reason": r} for t, r in gen.templates.skipped]
    plan["estimated_bytes"] = {"candidates": candidate_bytes, "workflows": wf_bytes * gen.candidates,
                               "total": candidate_bytes + wf_bytes * gen.candidates}
    return plan


def add_workflows(db: AmdflowDB, cfg: CampaignConfig, report: AddReport, progress: Progress | None = None) -> None:
    """Add a workflow for every candidate of the campaign that has none (bulk insert)."""
    from amdflow.workflows import candidate_workflow

    lp = db.launchpad
    query = {"campaign": cfg.name, "fw_ids": {}}
    pending = list(db.candidates.find(query, {"_id": 0, "candidate_id": 1, "formula": 1}))
    # Crash safety: a workflow added before its candidate doc was updated is found by metadata.
    existing = {
        wf["metadata"]["candidate_id"]: wf["nodes"]
        for wf in lp.workflows.find({"metadata.campaign": cfg.name, "metadata.amdflow": "candidate",
                                     "metadata.candidate_id": {"$in": [p["candidate_id"] for p in pending]}},
                                    {"metadata": 1, "nodes": 1})
    }
    for cid, nodes in existing.items():
        stages = {fw["spec"]["amdflow_stage"]: fw["fw_id"] for fw in lp.fireworks.find({"fw_id": {"$in": nodes}}, {"fw_id": 1, "spec.amdflow_stage": 1})}
        db.candidates.update_one({"candidate_id": cid}, {"$set": {"fw_ids": stages}})
    pending = [p for p in pending if p["candidate_id"] not in existing]
    for done, batch in enumerate(_batches(iter(pending), INSERT_BATCH), start=1):
        wfs = [candidate_workflow(p["candidate_id"], cfg.name, p["formula"], funnel=cfg.funnel.enabled) for p in batch]
        with _quiet_tqdm():
            lp.bulk_add_wfs(wfs)
        for p, wf in zip(batch, wfs, strict=True):
            fw_ids = {fw.spec["amdflow_stage"]: fw.fw_id for fw in wf.fws}
            db.candidates.update_one({"candidate_id": p["candidate_id"]}, {"$set": {"fw_ids": fw_ids}})
        report.new_workflows += len(wfs)
        if progress:
            progress(min(done * INSERT_BATCH, len(pending)), len(pending), "adding workflows")


def drop_orphan_fireworks(lp: Any, campaign: str) -> int:
    """Remove the campaign's Fireworks that belong to no workflow; how many.

    FireWorks inserts a workflow's Fireworks, then the workflow (``add_wf``, ``bulk_add_wfs``): an ``amdflow add``
    stopped between the two (a kill, the server refusing the second insert) leaves READY Fireworks that no workflow
    holds, which a rocket could check out and then neither lock nor complete. None of them can have run. One read of
    the campaign's Fireworks and workflows: called only when the last add did not finish (see :func:`add_campaign`).
    """
    fw_ids = {fw["fw_id"] for fw in lp.fireworks.find({"spec.campaign": campaign}, {"_id": 0, "fw_id": 1})}
    held = {n for wf in lp.workflows.find({"metadata.campaign": campaign}, {"_id": 0, "nodes": 1}) for n in wf["nodes"]}
    orphans = sorted(fw_ids - held)
    removed = 0
    for batch in _batches(iter(orphans), INSERT_BATCH):
        removed += lp.fireworks.delete_many({"fw_id": {"$in": batch}, "state": {"$in": ["READY", "WAITING"]}}).deleted_count
    return removed


def _has_workflow(db: AmdflowDB, campaign: str, kind: str, level: str, **metadata: str) -> bool:
    query = {"metadata.campaign": campaign, "metadata.amdflow": kind, "metadata.level": level,
             **{f"metadata.{k}": v for k, v in metadata.items()}}
    return db.launchpad.workflows.find_one(query, {"_id": 1}) is not None


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """FireWorks' bulk insert draws its own tqdm bar; amdflow shows one progress display."""
    import fireworks.core.launchpad as fw_launchpad

    original = fw_launchpad.tqdm
    fw_launchpad.tqdm = lambda iterable, *a, **k: iterable
    try:
        yield
    finally:
        fw_launchpad.tqdm = original


def campaign_levels(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(level, run type) of every hull a campaign builds: its final relax, and its funnel's potential."""
    levels = [("final", doc["run_type"])]
    if doc.get("funnel_run_type"):
        levels.append(("funnel", doc["funnel_run_type"]))
    return levels


def add_reference_workflows(db: AmdflowDB, cfg: CampaignConfig, run_type: str, report: AddReport, level: str = "final",
                            recovering: bool = False) -> None:
    """One reference workflow per element whose reference phases (of ``run_type``, at ``level``) are not in the database.

    ``recovering`` (the last add did not finish): an element whose workflow was added before its reference docs were
    inserted gets its docs, not a second workflow."""
    from amdflow.stages import pending_references
    from amdflow.workflows import reference_workflow

    pending = pending_references(db, cfg, run_type)
    by_element: dict[str, list[str]] = {}
    for ref in pending:
        by_element.setdefault(ref.element, []).append(ref.prototype)
    for element, prototypes in by_element.items():
        if recovering and _has_workflow(db, cfg.name, "reference", level, element=element):
            continue
        db.launchpad.add_wf(reference_workflow(cfg.name, element, prototypes, level))
        report.new_reference_workflows += 1
    if pending:
        db.references.insert_many([r.to_mongo() for r in pending], ordered=False)


def add_known_phases(db: AmdflowDB, cfg: CampaignConfig, run_type: str, report: AddReport, level: str = "final",
                     recovering: bool = False) -> None:
    """Import the campaign's known phases; relax mode: one workflow relaxing those not relaxed yet (at ``level``);
    ``recovering``: not a second one where the last add added it and stopped before its reference docs."""
    from amdflow.stages import import_known_phases
    from amdflow.workflows import known_workflow

    if cfg.analyze.known_phases is None:
        return
    known = import_known_phases(db, cfg, run_type)
    if level == "final" or not report.known:
        report.known = {"read": known.read, "kept": known.kept, "imported": known.imported, "skipped": known.skipped,
                        "note": known.note, "relaxations": 0}
    report.known["relaxations"] += len(known.pending)
    if known.pending:
        if not (recovering and _has_workflow(db, cfg.name, "known", level)):
            db.launchpad.add_wf(known_workflow(cfg.name, [(r.prototype, r.element) for r in known.pending], level))
        db.references.insert_many([r.to_mongo() for r in known.pending], ordered=False)


def add_campaign(db: AmdflowDB, cfg: CampaignConfig, allow_changed: bool = False, progress: Progress | None = None,
                 workflows: bool = True, workers: int | None = None) -> AddReport:
    """Generate candidates and add their workflows; running it twice adds nothing."""
    from amdflow.generate.templates import check_template_sources

    report = AddReport()
    check_template_sources(cfg)  # a missing folder or unknown label: nothing registered
    doc = register_campaign(db, cfg, allow_changed)
    from amdflow.stages.rounds import open_first_round

    open_first_round(db, cfg)
    # An add that stops (a kill, the database failing) leaves this mark: the next one repairs what FireWorks' inserts
    # may have left half done (Fireworks without their workflow; a workflow without its reference docs).
    recovering = doc.get("add_started_at") is not None
    db.campaigns.update_one({"name": cfg.name}, {"$set": {"add_started_at": utcnow()}})
    if recovering and workflows:
        dropped = drop_orphan_fireworks(db.launchpad, cfg.name)
        if dropped:
            logger.warning("the last `amdflow add` of %s stopped inside a workflow insert: %d Firework(s) without their "
                           "workflow removed (nothing had run); their workflows are added whole", cfg.name, dropped)
    levels = campaign_levels(doc)
    if workflows:  # first: a bad known-phases source stops here, before anything is generated
        for level, run_type in levels:
            add_known_phases(db, cfg, run_type, report, level, recovering)
    insert_candidates(db, cfg, report, progress, workers)
    if workflows:
        for level, run_type in levels:
            add_reference_workflows(db, cfg, run_type, report, level, recovering)
        add_workflows(db, cfg, report, progress)
    db.campaigns.update_one({"name": cfg.name}, {"$unset": {"add_started_at": ""}})
    db.flush()
    return report


def fw_state_counts(db: AmdflowDB, campaign: str) -> dict[str, int]:
    """The campaign's Fireworks per state: one count per FireWorks state on the (spec.campaign, state) index (an
    aggregation read every Firework: 5 s of `amdflow status` at 10k candidates on the embedded store)."""
    from fireworks.core.firework import Firework

    counts = {state: db.launchpad.fireworks.count_documents({"spec.campaign": campaign, "state": state})
              for state in Firework.STATE_RANKS}
    return {state: n for state, n in counts.items() if n}


def stage_times(db: AmdflowDB, campaign: str) -> dict[str, dict[str, float]]:
    """Completed launches per stage: count, summed run time, and wall time (the union of their time spans, so that
    a batch of launches that ran together, or rockets in parallel, count once), seconds."""
    lp = db.launchpad
    stage_of = {fw["fw_id"]: fw["spec"].get("amdflow_stage", "?")
                for fw in lp.fireworks.find({"spec.campaign": campaign}, {"fw_id": 1, "spec.amdflow_stage": 1})}
    totals: dict[str, list[float]] = {}
    spans: dict[str, list[tuple[datetime, datetime]]] = {}
    # the state is tested here: FireWorks' fw_id index then serves the query alone (few launches are not COMPLETED)
    for launch in lp.launches.find({"fw_id": {"$in": list(stage_of)}},
                                   {"fw_id": 1, "runtime_secs": 1, "time_start": 1, "time_end": 1, "state": 1}):
        if launch.get("state") != "COMPLETED":
            continue
        stage = stage_of[launch["fw_id"]]
        totals.setdefault(stage, []).append(float(launch.get("runtime_secs") or 0.0))
        start, end = _as_datetime(launch.get("time_start")), _as_datetime(launch.get("time_end"))
        if start is not None and end is not None:
            spans.setdefault(stage, []).append((start, end))
    out = {}
    for stage, v in sorted(totals.items()):
        wall = _union_seconds(spans.get(stage, [])) if len(spans.get(stage, [])) == len(v) else sum(v)
        out[stage] = {"launches": len(v), "total_s": round(sum(v), 2), "mean_s": round(sum(v) / len(v), 3),
                      "wall_s": round(wall, 2)}
    return out


def _as_datetime(value: Any) -> datetime | None:
    """A launch's time stamp: a datetime (MongoDB) or its ISO string (FireWorks' JSON form)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _union_seconds(spans: list[tuple[datetime, datetime]]) -> float:
    """Seconds covered by the union of [start, end] spans."""
    total, current = 0.0, None
    for start, end in sorted(spans):
        if current is None or start > current[1]:
            if current is not None:
                total += (current[1] - current[0]).total_seconds()
            current = (start, end)
        elif end > current[1]:
            current = (current[0], end)
    if current is not None:
        total += (current[1] - current[0]).total_seconds()
    return total


def campaign_status(db: AmdflowDB, campaign: str) -> dict[str, Any]:
    """Counts per state: candidates, Fireworks, references, hull."""
    doc = db.campaigns.find_one({"name": campaign}, {"_id": 0, "config": 1, "chemsys": 1, "run_type": 1, "model_id": 1,
                                                    "funnel_run_type": 1, "budget_used": 1})
    if doc is None:
        raise AmdflowError(f"campaign '{campaign}' is not in the database: add it with `amdflow add CAMPAIGN.yaml`")
    cand = {d["_id"]: d["n"] for d in db.candidates.aggregate([{"$match": {"campaign": campaign}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}])}
    refs = {d["_id"]: d["n"] for d in db.references.aggregate([{"$match": {"run_type": doc["run_type"], "element": {"$in": doc["config"]["elements"]}}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}])}
    threshold = doc["config"]["analyze"]["promising_e_above_hull"]
    thermo_q = {"hull_chemsys": doc["chemsys"], "run_type": doc["run_type"]}
    return {
        "campaign": campaign,
        "chemsys": doc["chemsys"],
        "run_type": doc["run_type"],
        "model_id": doc.get("model_id"),
        "candidates": {**{s.value: cand.get(s.value, 0) for s in CandidateState},
                       # a state no stage writes (a document edited by hand): counted, not hidden
                       **({"invalid": sum(n for k, n in cand.items() if k not in {s.value for s in CandidateState})}
                          if set(cand) - {s.value for s in CandidateState} else {})},
        "candidates_total": sum(cand.values()),
        "fireworks": fw_state_counts(db, campaign),
        "references": refs,
        "stage_times": stage_times(db, campaign),
        "funnel": funnel_status(db, campaign, doc),
        "random_search": random_search_status(db, campaign, doc),
        "budget": {"limit": doc["config"]["relax"].get("budget"), "used": int(doc.get("budget_used", 0)),
                   "over_budget": cand.get(CandidateState.OVER_BUDGET.value, 0)},
        "rounds": rounds_status(db, campaign) if doc["config"].get("rounds") else None,
        "thermo": {
            "materials": db.thermo.count_documents(thermo_q),
            "stable": db.thermo.count_documents({**thermo_q, "is_stable": True}),
            "stable_candidates": db.thermo.count_documents({**thermo_q, "is_stable": True, "campaign": campaign}),
            "promising": db.thermo.count_documents({**thermo_q, "campaign": campaign, "e_above_hull": {"$lte": threshold}}),
        },
    }


def rounds_status(db: AmdflowDB, campaign: str) -> dict[str, Any]:
    """The campaign's active-learning rounds: the open one (share, used, finished or what it waits for) and each
    closed one's figures (hits, hit rate, checkpoint)."""
    from amdflow.stages import load_campaign_config
    from amdflow.stages.rounds import round_status

    cfg, doc = load_campaign_config(db, campaign)
    out = round_status(db, cfg)
    out["error"] = (doc.get("round") or {}).get("error")
    out["screen_checkpoint"] = doc.get("screen_checkpoint")
    return out


def random_search_status(db: AmdflowDB, campaign: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per composition of the campaign's random search (none: []): starts generated and relaxed, stopped after the
    first pass, the lowest structure's ML energy and space group, how often it was found, and whether that
    reaches stop_found (AIRSS's signal that the composition is searched enough)."""
    from amdflow.stages.random_search import formula_search

    source = next((t for t in doc["config"]["templates"] if t.get("source") == "random"), None)
    if source is None:
        return []
    stop_found = int(source.get("stop_found", 3))
    stats = formula_search(db, campaign, stop_found)
    return [{**s.as_dict(), "stop_found": stop_found} for s in stats.values()]


def funnel_status(db: AmdflowDB, campaign: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The funnel's counts: relaxed by its potential, passed, cut, relaxed duplicates, deferred; its references and hull."""
    run_type = doc.get("funnel_run_type")
    if not run_type:
        return {}
    by_state = {d["_id"]: d["n"] for d in db.candidates.aggregate([
        {"$match": {"campaign": campaign, "funnel.run_type": run_type}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}])}
    refs = {d["_id"]: d["n"] for d in db.references.aggregate([
        {"$match": {"run_type": run_type, "element": {"$in": doc["config"]["elements"]}}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}])}
    cut = doc["config"].get("funnel", {}).get("max_e_above_hull")
    return {
        "run_type": run_type,
        "max_e_above_hull": cut,
        "relaxed": sum(by_state.values()),
        "passed": sum(by_state.get(s.value, 0) for s in (CandidateState.PRERELAXED, CandidateState.RELAXED, CandidateState.ANALYZED)),
        "cut": by_state.get(CandidateState.FUNNEL_CUT.value, 0),
        "relaxed_duplicates": by_state.get(CandidateState.DUPLICATE.value, 0),
        "failed": by_state.get(CandidateState.FAILED.value, 0),
        "deferred": db.candidates.count_documents({"campaign": campaign, "funnel.run_type": run_type, "funnel.deferred": True,
                                                   "state": CandidateState.PRERELAXED.value}),
        # the potential's guard tripped: passed on unranked (never dropped)
        "ml_failed": db.candidates.count_documents({"campaign": campaign, "funnel.run_type": run_type, "funnel.ml_failed": True}),
        "references": refs,
        "hull_materials": db.thermo.count_documents({"hull_chemsys": doc["chemsys"], "run_type": run_type}),
    }


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _launch_dir(root: Path) -> Path:
    path = root / f"launcher_{datetime.now().strftime('%Y-%m-%d-%H-%M-%S-%f')}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def _tidy_launch_dir(path: Path) -> None:
    """Remove a launch dir that holds nothing but FireWorks' FW.json (the DB has it all)."""
    names = {p.name for p in path.iterdir()}
    if names <= {"FW.json", "FW_offline.json"}:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class RunReport:
    launched: int = 0
    recovered: int = 0
    fw_states: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    rounds_closed: list[dict[str, Any]] = field(default_factory=list)  # active-learning rounds this run closed


def run_campaign(db: AmdflowDB, cfg: CampaignConfig, progress: Progress | None = None,
                 max_fireworks: int | None = None, log_level: str = "WARNING") -> RunReport:
    """Run every READY Firework of the campaign in this process, all categories.

    Highest ``_priority`` first (predictions, then references, then candidates by
    predicted energy). The embedded store is written after every Firework. On the
    embedded store (which amdflow holds exclusively) Fireworks left RUNNING by an
    interrupted run are reset to run again.
    """
    import fireworks.core.rocket as fw_rocket

    report = RunReport()
    # The Rocket logs at FireWorks' ROCKET_STREAM_LOGLEVEL, not launch_rocket's strm_lvl.
    previous_level, fw_rocket.ROCKET_STREAM_LOGLEVEL = fw_rocket.ROCKET_STREAM_LOGLEVEL, log_level
    previous_ping = fw_rocket.start_ping_launch
    if db.embedded is not None:
        # The Rocket's ping thread wakes when its Firework ends and pings once more, while
        # this thread already writes the store or checks out the next Firework: mongomock
        # is not thread-safe, and that ping then raised "No Launch exists with launch_id=N"
        # in the thread. Pings guard against lost runs of other processes; the embedded
        # store has none (it is exclusive, and `amdflow run` resets RUNNING launches at start).
        # The Rocket's own last ping, in this thread, still runs.
        fw_rocket.start_ping_launch = _no_ping_thread
    try:
        return _run_loop(db, cfg, report, progress, max_fireworks, log_level)
    finally:
        fw_rocket.ROCKET_STREAM_LOGLEVEL = previous_level
        fw_rocket.start_ping_launch = previous_ping


def _funnel_batch_due(db: AmdflowDB, campaign: str) -> bool:
    """Whether to relax the campaign's READY funnel Fireworks now, as one batch: some wait, and nothing upstream of the
    funnel is READY. Upstream (predictions, dedups, references, known phases, their analyses) is every Firework whose
    ``_priority`` is above the final relaxations' band (``stages.funnel.RELAX_AFTER_FUNNEL_PRIORITY``); a dedup hands its
    priority (-E_f) to its funnel Firework, so ordering by priority alone would relax the funnel one candidate at a time."""
    from pymongo import DESCENDING

    from amdflow.stages.funnel import RELAX_AFTER_FUNNEL_PRIORITY

    fws = db.launchpad.fireworks
    if not _ready(db, campaign, "funnel"):
        return False
    # READY Fireworks of the campaign, highest priority first (the (campaign, state) index), until the relax band
    for doc in fws.find({"spec.campaign": campaign, "state": "READY"}, {"spec.amdflow_stage": 1, "spec._priority": 1}
                        ).sort([("spec._priority", DESCENDING)]):
        spec = doc.get("spec") or {}
        priority = spec.get("_priority")
        if priority is None or priority <= RELAX_AFTER_FUNNEL_PRIORITY:
            return True
        if spec.get("amdflow_stage") != "funnel":
            return False
    return True


def _ready(db: AmdflowDB, campaign: str, stage: str) -> bool:
    """Whether any Firework of ``stage`` of the campaign is READY: equalities on the batched check-out's index (a
    planner without index intersection, like the wire test server's, scanned every Firework for the same query
    without the category: measured 6 s per call at 30k candidates, three calls per Firework of `amdflow run`)."""
    from amdflow.workflows import CATEGORIES

    query = {"state": "READY", "spec._category": CATEGORIES[stage], "spec.amdflow_stage": stage, "spec.campaign": campaign}
    return db.launchpad.fireworks.find_one(query, {"_id": 1}) is not None


def _run_batch(db: AmdflowDB, cfg: CampaignConfig, stage: str, at_most: int | None,
               say: Callable[[str], None] | None = None) -> int:
    """One batch of the campaign's READY ``stage`` Fireworks (predict, dedup or funnel: the batched rocket's path); how many ran."""
    from amdflow.rocket import run_batched_rocket
    from amdflow.settings import get_settings

    if not _ready(db, cfg.name, stage):
        return 0
    settings = get_settings()
    size = {"funnel": settings.funnel_batch_size, "dedup": settings.dedup_batch_size}.get(stage, settings.predict_batch_size)
    size = min(at_most, size) if at_most else size
    if say:
        say({"funnel": f"funnel: relaxing a batch of up to {size} with {cfg.funnel.engine}",
             "dedup": f"dedup: a batch of up to {size}"}.get(stage, f"predict: a batch of up to {size} with CGCNN"))
    report = run_batched_rocket(db.launchpad, batch_size=size, workers=funnel_workers(settings) if stage == "funnel" else 1,
                                campaign=cfg.name, pipeline=False, stage=stage, max_batches=1)
    return report.fireworks + report.fizzled


def funnel_workers(settings: Any) -> int:
    """Processes for a funnel potential without a batched path (CHGNet on CPU): the setting, else the cores (at most 8)."""
    return settings.funnel_workers or min(os.cpu_count() or 1, 8)


def _no_ping_thread(launchpad: Any, launch_id: int) -> None:
    """``fireworks.core.rocket.start_ping_launch`` without its thread (the embedded store: see run_campaign)."""
    return None


RUN_ELSEWHERE = ("funnel", "predict", "dedup")  # stages `amdflow run` runs in batches (the batched rocket's path)


def next_ready_fw(lp: Any, fworker: Any, campaign: str) -> int | None:
    """The id of the READY Firework of ``campaign`` that FireWorks' own check-out would give ``fworker`` (highest
    ``_priority`` first), or None.

    Sent as ``{spec.campaign, state}`` (two equalities, one index); the worker's category, its ``_fworker`` pinning
    and the stages run in batches are tested on the returned documents. FireWorks' own query carries a top-level
    ``$or`` (the ``_fworker`` clause) that keeps the wire test server from any index: measured 7.5 s per Firework at
    10k candidates (a scan of 41k Fireworks per check-out), for the over-budget relax Fireworks of a campaign.
    """
    from fireworks.fw_config import SORT_FWS
    from pymongo import ASCENDING, DESCENDING

    from amdflow.batch_launch import _split_fworker_clause

    _, pinned_elsewhere = _split_fworker_clause(fworker.query, fworker.name)
    categories = [fworker.category] if isinstance(fworker.category, str) else list(fworker.category or [])
    sort = [("spec._priority", DESCENDING)]
    if SORT_FWS.upper() in ("FIFO", "FILO"):
        sort.append(("created_on", ASCENDING if SORT_FWS.upper() == "FIFO" else DESCENDING))
    fields = {"fw_id": 1, "spec.amdflow_stage": 1, "spec._category": 1, "spec._fworker": 1}
    for doc in lp.fireworks.find({"spec.campaign": campaign, "state": "READY"}, fields).sort(sort):
        spec = doc.get("spec") or {}
        if spec.get("amdflow_stage") in RUN_ELSEWHERE or pinned_elsewhere(doc):
            continue
        if categories and spec.get("_category") not in categories and not (spec.get("_category") is None and "__none__" in categories):
            continue
        return int(doc["fw_id"])
    return None


def _launch_next(lp: Any, fworker: Any, campaign: str, log_level: str) -> int:
    """Run one Firework (FireWorks' Rocket, by id), chosen by :func:`next_ready_fw`; 0 if none is READY.

    The chosen Firework is taken READY -> RESERVED here (one atomic update), so another process
    cannot start it between the choice and the Rocket's check-out, which takes a RESERVED one by id.
    """
    from fireworks.core.rocket_launcher import launch_rocket

    for _ in range(20):  # another process may take the chosen one first: choose again
        fw_id = next_ready_fw(lp, fworker, campaign)
        if fw_id is None:
            return 0
        taken = lp.fireworks.update_one({"fw_id": fw_id, "state": "READY"},
                                        {"$set": {"state": "RESERVED", "updated_on": datetime.now(UTC)}})
        if taken.modified_count:
            return int(launch_rocket(lp, fworker, fw_id=fw_id, strm_lvl=log_level))
    return 0


def budget_spent(db: AmdflowDB, campaign: str) -> bool:
    """Whether the campaign's stored ``relax.budget`` (``amdflow budget`` changes it) is used up."""
    doc = db.campaigns.find_one({"name": campaign}, {"budget_used": 1, "config.relax.budget": 1}) or {}
    limit = ((doc.get("config") or {}).get("relax") or {}).get("budget")
    return limit is not None and int(doc.get("budget_used", 0)) >= int(limit)


def _run_over_budget(db: AmdflowDB, cfg: CampaignConfig, at_most: int | None, root: Path) -> int:
    """With the budget spent, the campaign's READY relax Fireworks in one bulk check-out and completion; how many ran.

    Each runs its own RelaxTask (its funnel check, then the budget check), which ends it as
    over_budget in milliseconds: no relaxation, the workflow defused until ``amdflow budget``
    releases it. Through FireWorks' Rocket each was a full launch (about 35 ms on the embedded
    store, 0.5-7 s on the wire test server at 10k candidates). A candidate that does get a
    slot (it holds one from an earlier try, or the budget was raised meanwhile) is relaxed
    here, in a launch folder of its own, as the Rocket would.
    """
    from fireworks import FWAction, FWorker
    from fireworks.utilities.fw_serializers import load_object

    from amdflow.batch_launch import BatchLauncher
    from amdflow.firetasks import RelaxTask
    from amdflow.settings import get_settings

    if not budget_spent(db, cfg.name):
        return 0
    lp = db.launchpad
    fworker = FWorker(name="amdflow-run", category="vasp", query={"spec.campaign": cfg.name, "spec.amdflow_stage": "relax"})
    size = min(at_most, get_settings().dedup_batch_size) if at_most else get_settings().dedup_batch_size
    claims = BatchLauncher(lp, fworker, str(root)).checkout(size)
    results = []
    for claim in claims:
        spec = {**claim.fw.spec, "_fw_env": fworker.env}
        tasks = [load_object(t) for t in spec.get("_tasks", [])] if claim.bulk else claim.fw.tasks
        try:
            if len(tasks) != 1 or not isinstance(tasks[0], RelaxTask):
                raise RuntimeError(f"Firework {claim.fw_id} is not an amdflow relax Firework: run it with `rlaunch`")
            task = tasks[0]
            task.launchpad, task.fw_id = lp, claim.fw_id
            folder = _launch_dir(root)
            claim.launch.launch_dir = str(folder)
            with _in_dir(folder):
                action = task.run_task(spec)
            _tidy_launch_dir(folder)
            results.append((claim, action, "COMPLETED"))
        except Exception as err:  # as the Rocket: the Firework fizzles with its stack trace, the others go on
            import traceback

            trace = "".join(traceback.format_exception(err))
            results.append((claim, FWAction(stored_data={"_message": f"relax: {type(err).__name__}: {err}",
                                                         "_exception": {"_stacktrace": trace}}), "FIZZLED"))
    BatchLauncher(lp, fworker, str(root)).complete(results)
    return len(results)


def _run_loop(db: AmdflowDB, cfg: CampaignConfig, report: RunReport, progress: Progress | None,
              max_fireworks: int | None, log_level: str) -> RunReport:
    from fireworks import FWorker

    from amdflow.stages import analyze_stage

    lp = db.launchpad
    rounds_before = len((db.campaigns.find_one({"name": cfg.name}, {"rounds": 1}) or {}).get("rounds") or [])
    if db.embedded is not None:
        lost = lp.detect_lostruns(expiration_secs=0, rerun=True, query={"spec.campaign": cfg.name})
        report.recovered = len(lost[1])
    # Funnel Fireworks run in batches (one relaxation batch, one hull build): once nothing upstream of
    # them is READY (every prediction, dedup and reference has run, so a batch holds all the candidates
    # that passed), before the final relaxations (see _funnel_batch_due).
    fworker = FWorker(name="amdflow-run", category=["gpu", "cpu", "vasp"],
                      query={"spec.campaign": cfg.name, "spec.amdflow_stage": {"$nin": list(RUN_ELSEWHERE)}})
    root = Path(cfg.output_dir or ".") / "launches"
    total = lp.fireworks.count_documents({"spec.campaign": cfg.name})
    # The progress count, a pass over every Firework of the campaign, is taken again only after 10x its own cost
    # (it was 45 % of a 1,900-candidate run when taken after every Firework); in between, what ran is added.
    done, counted_at, count_cost, launched_then = 0, -1e9, 0.0, 0
    while max_fireworks is None or report.launched < max_fireworks:
        if progress:
            now = time.perf_counter()
            if now - counted_at > max(1.0, 10 * count_cost):
                counts = fw_state_counts(db, cfg.name)
                done, launched_then = sum(counts.get(s, 0) for s in DONE_STATES), report.launched
                counted_at, count_cost = time.perf_counter(), time.perf_counter() - now
            done_now = min(done + report.launched - launched_then, total)
            progress(done_now, total, "running Fireworks")
        else:
            done_now = 0
        say = (lambda what, done=done_now: progress(done, total, what)) if progress else None
        ldir = _launch_dir(root)
        with _in_dir(ldir):
            left = max_fireworks and max_fireworks - report.launched
            ran = _run_batch(db, cfg, "predict", left, say)  # CGCNN in batches, as the GPU rocket does
            if not ran:  # then dedup in batches, bucket by bucket, as the batched CPU rocket does
                ran = _run_batch(db, cfg, "dedup", left, say)
            if not ran and _funnel_batch_due(db, cfg.name):
                ran = _run_batch(db, cfg, "funnel", left, say)
            if not ran:  # relax Fireworks beyond the DFT budget: decided in bulk, no Rocket each
                ran = _run_over_budget(db, cfg, left, root)
            if not ran:
                ran = _launch_next(lp, fworker, cfg.name, log_level)
            if not ran:
                ran = _run_batch(db, cfg, "funnel", left, say)
        _tidy_launch_dir(ldir)
        db.flush()
        if not ran and cfg.rounds is not None:  # a finished round: close it (retrain, re-rank) and run the next
            from amdflow.stages.rounds import advance_quietly

            advanced = advance_quietly(db, cfg.name)
            db.flush()
            if advanced and advanced.get("opened"):
                continue
        if not ran:
            break
        report.launched += ran
    report.fw_states = fw_state_counts(db, cfg.name)
    history = (db.campaigns.find_one({"name": cfg.name}, {"rounds": 1}) or {}).get("rounds") or []
    report.rounds_closed = history[rounds_before:]  # closed here or by the analyses this run launched
    if progress:
        progress(sum(report.fw_states.get(s, 0) for s in DONE_STATES), total, "building hull")
    report.outputs = analyze_stage(db, cfg.name, plot=True, always_refresh=False)
    db.flush()
    return report


def rescreen(db: AmdflowDB, cfg: CampaignConfig) -> dict[str, int]:
    """Re-screen a campaign with its (changed) screen settings, e.g. a fine-tuned checkpoint.

    Stores the campaign file's settings, then reruns the predict Firework of every
    candidate whose relaxation has not started: FireWorks resets the rest of its chain,
    and the next run predicts, screens and dedups it again. Relaxed candidates keep
    their results.
    """
    register_campaign(db, cfg, allow_changed=True)
    lp = db.launchpad
    started = {fw["fw_id"] for fw in lp.fireworks.find(
        {"spec.campaign": cfg.name, "spec.amdflow_stage": "relax", "state": {"$in": ["RUNNING", "RESERVED", "COMPLETED"]}}, {"fw_id": 1})}
    counts = {"reset": 0, "kept": 0}
    for cand in db.candidates.find({"campaign": cfg.name, "fw_ids.predict": {"$exists": True}}, {"candidate_id": 1, "fw_ids": 1}):
        if cand["fw_ids"].get("relax") in started:
            counts["kept"] += 1
            continue
        lp.rerun_fw(cand["fw_ids"]["predict"])
        db.candidates.update_one({"candidate_id": cand["candidate_id"]},
                                 {"$set": {"state": CandidateState.GENERATED.value, "prediction": None, "dedup": None, "updated_at": utcnow()}})
        counts["reset"] += 1
    db.flush()
    return counts


def parse_budget_change(change: str, current: int | None) -> int | None:
    """``+N`` / ``-N`` (relative), ``N`` (absolute) or ``none`` (no limit) -> the new budget."""
    text = change.strip().lower()
    if text in ("none", "unlimited"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise AmdflowError(f"budget change '{change}' is not +N, -N, N or none: e.g. `amdflow budget CAMPAIGN +500`") from None
    if text[0] in "+-":
        if current is None:
            raise AmdflowError(f"the campaign has no relax budget to change by {change}: give a number (e.g. 500) or none")
        value = current + value
    if value < 0:
        raise AmdflowError(f"budget {value} is negative: give a number of relaxations >= 0")
    return value


def change_budget(db: AmdflowDB, name: str, change: str) -> dict[str, Any]:
    """Set the campaign's relax budget and release that many waiting (over_budget) candidates, best-ranked first.

    Released candidates have their relax Firework run again (and its analyze re-ignited);
    their relaxations take slots as they start, so a release never exceeds the budget,
    whatever runs meanwhile. Lowering the budget stops relaxations not yet started.
    """
    from amdflow.stages import load_campaign_config

    cfg, doc = load_campaign_config(db, name)
    limit = parse_budget_change(change, cfg.relax.budget)
    db.campaigns.update_one({"name": name}, {"$set": {"config.relax.budget": limit, "updated_at": utcnow()}})
    used = int(doc.get("budget_used", 0))
    free = None if limit is None else max(limit - used, 0)
    waiting = list(db.candidates.find({"campaign": name, "state": CandidateState.OVER_BUDGET.value},
                                      {"_id": 0, "candidate_id": 1, "fw_ids": 1, "funnel": 1}))
    lp = db.launchpad
    relax_ids = [c["fw_ids"]["relax"] for c in waiting if "relax" in (c.get("fw_ids") or {})]
    fws = {f["fw_id"]: f for f in lp.fireworks.find({"fw_id": {"$in": relax_ids}}, {"fw_id": 1, "spec._priority": 1})}

    def rank(c: dict[str, Any]) -> tuple[float, str]:  # the relax Firework's priority: best (highest) first
        return (-float(fws.get(c["fw_ids"].get("relax"), {}).get("spec", {}).get("_priority", 0.0)), c["candidate_id"])

    released = 0
    for cand in sorted(waiting, key=rank)[:free]:
        fw_ids = cand["fw_ids"]
        lp.rerun_fw(fw_ids["relax"])
        if "analyze" in fw_ids and lp.fireworks.find_one({"fw_id": fw_ids["analyze"], "state": "DEFUSED"}, {"_id": 1}):
            lp.reignite_fw(fw_ids["analyze"])
        back = CandidateState.PRERELAXED if cand.get("funnel") else CandidateState.UNIQUE
        db.candidates.update_one({"candidate_id": cand["candidate_id"]}, {"$set": {"state": back.value, "updated_at": utcnow()}})
        released += 1
    db.flush()
    return {"budget": limit, "used": used, "released": released, "waiting": len(waiting) - released}


def refunnel(db: AmdflowDB, cfg: CampaignConfig) -> dict[str, int]:
    """Store the campaign file's funnel cut (``max_e_above_hull``, ``top_k_per_formula``) and apply it again.

    Every candidate the funnel relaxed whose final relaxation has not started is decided
    again on the ML hull as it stands, with nothing relaxed again: one now inside the cut
    has its relax and analyze Fireworks re-ignited (or, cut by the check before the
    relax, rerun); one now outside has them defused. A changed potential or relaxation
    setting is a different hull: that needs a new campaign, not this.
    """
    from amdflow.stages import load_campaign_config, refresh_funnel_hull
    from amdflow.stages.funnel import decide_again

    stored, doc = load_campaign_config(db, cfg.name)
    if not doc.get("funnel_run_type") or not cfg.funnel.enabled:
        raise AmdflowError(f"campaign '{cfg.name}' has no funnel (funnel.engine: none when it was added): nothing to cut again")
    keep = ("engine", "model", "modal", "fmax", "max_steps", "relax_cell", "checkpoint", "correction")
    if any(getattr(stored.funnel, k, None) != getattr(cfg.funnel, k, None) for k in keep):
        raise AmdflowError("refunnel applies a changed cut (funnel.max_e_above_hull, funnel.top_k_per_formula); the "
                           "file also changes the funnel's potential or relaxation settings, which would be a new hull: "
                           "keep them, or start a new campaign")
    register_campaign(db, cfg, allow_changed=True)
    run_type = doc["funnel_run_type"]
    refresh_funnel_hull(db, cfg, run_type)
    lp = db.launchpad
    counts = {"released": 0, "cut": 0, "unchanged": 0, "started": db.candidates.count_documents(
        {"campaign": cfg.name, "funnel.run_type": run_type,
         "state": {"$in": [CandidateState.RELAXED.value, CandidateState.ANALYZED.value]}})}
    for cand in db.candidates.find({"campaign": cfg.name, "funnel.run_type": run_type, "funnel.duplicate_of": None,
                                    "state": {"$in": [CandidateState.PRERELAXED.value, CandidateState.FUNNEL_CUT.value]}},
                                   {"_id": 0, "candidate_id": 1, "formula": 1, "state": 1, "funnel": 1, "fw_ids": 1,
                                    "relax_started_at": 1}):
        fw_ids = cand.get("fw_ids") or {}
        if cand.get("relax_started_at"):  # its final relaxation has started: kept
            counts["started"] += 1
            continue
        if cand["funnel"].get("ml_failed"):  # no ML energy to cut on: it stays passed, unranked
            counts["unchanged"] += 1
            continue
        reason, fields = decide_again(db, cfg, cand)
        after = [fw_ids[s] for s in ("relax", "analyze") if s in fw_ids]
        states = {fw["fw_id"]: fw["state"] for fw in lp.fireworks.find({"fw_id": {"$in": after}}, {"fw_id": 1, "state": 1})}
        if reason is None and cand["state"] == CandidateState.FUNNEL_CUT.value:
            relax_state = states.get(fw_ids.get("relax"))
            if relax_state == "COMPLETED":  # cut by the check before the relax: run that Firework again
                lp.rerun_fw(fw_ids["relax"])
            for fw_id in after:
                if states.get(fw_id) == "DEFUSED":
                    lp.reignite_fw(fw_id)
            fields["funnel.checked_at_relax"] = None
            db.candidates.update_one({"candidate_id": cand["candidate_id"]},
                                     {"$set": {**fields, "state": CandidateState.PRERELAXED.value, "updated_at": utcnow()}})
            counts["released"] += 1
        elif reason is not None and cand["state"] == CandidateState.PRERELAXED.value:
            for fw_id in after:  # only Fireworks that have not started (defuse_fw would rerun others first)
                if states.get(fw_id) in ("WAITING", "READY"):
                    lp.defuse_fw(fw_id)
            db.candidates.update_one({"candidate_id": cand["candidate_id"]},
                                     {"$set": {**fields, "state": CandidateState.FUNNEL_CUT.value, "updated_at": utcnow()}})
            counts["cut"] += 1
        else:
            db.candidates.update_one({"candidate_id": cand["candidate_id"]}, {"$set": fields})
            counts["unchanged"] += 1
    db.flush()
    return counts


@dataclass
class FizzledRerun:
    """What ``rerun_fizzled`` did: Fireworks reset, and those skipped because their workflow stayed locked."""

    reset: list[int] = field(default_factory=list)
    locked: list[int] = field(default_factory=list)


def _lock_marks(lp: Any, wf_ids: list[Any], fireworks_only: bool = False) -> dict[Any, tuple[Any, ...]]:
    """Per locked workflow: its lock, its ``updated_on``, and the state and ``updated_on`` of each of its Fireworks.

    A live FireWorks lock is held for a few database commands and whatever it guards writes
    ``updated_on``; a lock whose marks do not move is not being used.
    """
    marks: dict[Any, tuple[Any, ...]] = {}
    lock = True if fireworks_only else {"$exists": True}  # FireWorks' own lock, or any (amdflow's batch locks too)
    for wf in lp.workflows.find({"_id": {"$in": wf_ids}, "locked": lock}, {"locked": 1, "updated_on": 1, "nodes": 1}):
        fws = lp.fireworks.find({"fw_id": {"$in": wf["nodes"]}}, {"fw_id": 1, "state": 1, "updated_on": 1})
        marks[wf["_id"]] = (wf["locked"], str(wf.get("updated_on")),
                            tuple(sorted((fw["fw_id"], fw.get("state"), str(fw.get("updated_on"))) for fw in fws)))
    return marks


def _held_locks(lp: Any, wf_ids: list[Any], quiet_s: float, poll_s: float, max_watch_s: float | None = None) -> list[Any]:
    """Workflows among ``wf_ids`` whose FireWorks lock stayed for ``quiet_s`` seconds in a row with nothing of theirs changing.

    A change restarts that workflow's clock: a rocket may change a Firework (check-out sets
    it RUNNING) just before it blocks on the stale lock. A lock that goes away was live.
    Watching stops after ``max_watch_s`` (default ``2 * quiet_s``); a workflow still changing
    then keeps its lock.
    """
    start = time.monotonic()
    deadline = start + (2 * quiet_s if max_watch_s is None else max_watch_s)
    marks = _lock_marks(lp, wf_ids, fireworks_only=True)
    since = dict.fromkeys(marks, start)
    stale: list[Any] = []
    while marks:
        now_t = time.monotonic()
        for k in [k for k in marks if now_t - since[k] >= quiet_s]:
            stale.append(k)
            del marks[k]
        if not marks or now_t >= deadline:
            break
        time.sleep(max(min(poll_s, deadline - now_t), 0.0))
        now = _lock_marks(lp, list(marks), fireworks_only=True)
        for k in list(marks):
            if k not in now:
                del marks[k]  # released: it was live
            elif now[k] != marks[k]:
                marks[k], since[k] = now[k], time.monotonic()
    return stale


def _campaign_workflow_ids(lp: Any, campaign: str, fw_query: dict[str, Any] | None = None) -> dict[Any, list[int]]:
    """Workflow id -> fw_ids of the campaign's Fireworks (optionally only those matching ``fw_query``) it holds."""
    fw_ids = lp.get_fw_ids({"spec.campaign": campaign, **(fw_query or {})})
    out: dict[Any, list[int]] = {}
    for wf in lp.workflows.find({"nodes": {"$in": fw_ids}}, {"nodes": 1}):
        out[wf["_id"]] = sorted(set(wf["nodes"]) & set(fw_ids))
    return out


def rerun_fizzled(db: AmdflowDB, campaign: str, stage: str | None = None, lock_wait_s: float = 10.0) -> FizzledRerun:
    """Reset FIZZLED Fireworks of a campaign (optionally one stage) to run again.

    FireWorks' ``rerun_fw`` waits ``WFLOCK_EXPIRATION_SECS`` (300 s) on a locked workflow,
    silently. A workflow still locked after ``lock_wait_s`` is skipped and reported instead:
    a live rocket holds the lock, or a dead one left it (``rerun_lost`` releases those).
    """
    query: dict[str, Any] = {"state": "FIZZLED"}
    if stage:
        query["spec.amdflow_stage"] = stage
    lp = db.launchpad
    by_wf = _campaign_workflow_ids(lp, campaign, query)
    locked = set(_lock_marks(lp, list(by_wf)))
    if locked:  # wait for live locks to go; only a lock held all along skips its workflow
        deadline = time.monotonic() + lock_wait_s
        while locked and time.monotonic() < deadline:
            time.sleep(0.2)
            locked = set(_lock_marks(lp, list(locked)))
    out = FizzledRerun()
    for wf_id, fw_ids in by_wf.items():
        (out.locked if wf_id in locked else out.reset).extend(fw_ids)
    for fw_id in out.reset:
        lp.rerun_fw(fw_id)
    out.reset.sort()
    out.locked.sort()
    db.flush()
    return out


def rerun_lost(db: AmdflowDB, campaign: str, lost_after_s: float, stale_after_s: float,
               on_watch: Callable[[int, float], None] | None = None, poll_s: float = 0.1) -> dict[str, int]:
    """Recover from killed rockets: release stale claims and workflow locks, then rerun lost launches.

    A launch is lost when RUNNING without a ping for ``lost_after_s`` seconds (FireWorks'
    ``detect_lostruns``; its rerun keeps the lost launch as history). Claims and batch
    workflow locks older than ``stale_after_s`` belong to dead rockets (a live batch holds
    a lock for a few database commands).

    FireWorks' own workflow lock (``locked: True``) has no time stamp. A rocket that dies, or
    whose database command met a restarting server, inside FireWorks' check-out or
    completion leaves it, and every later ``rerun_fw`` of that workflow waits 300 s on it.
    Such a lock is released when, watched for up to ``2 * stale_after_s`` seconds, it stays
    ``stale_after_s`` seconds in a row while nothing of its workflow changes (a live one is
    held for milliseconds and what it guards writes ``updated_on``); ``on_watch(n, seconds)``
    is told before the watch.
    """
    from amdflow.batch_launch import release_stale

    lp = db.launchpad
    claims, locks = release_stale(lp, stale_after_s, stale_after_s)
    # amdflow's own claims (dedup per formula, hull per system) left by dead processes
    cutoff = datetime.fromtimestamp(utcnow().timestamp() - stale_after_s, UTC)
    claims += db.coll("locks").delete_many({"at": {"$lt": cutoff}}).deleted_count
    # the sparse index on `locked` finds them without listing the campaign's Fireworks
    wf_ids = [wf["_id"] for wf in lp.workflows.find({"metadata.campaign": campaign, "locked": True}, {"_id": 1})]
    fw_locks = 0
    seen = _lock_marks(lp, wf_ids, fireworks_only=True)
    if seen:
        if on_watch:
            on_watch(len(seen), stale_after_s)
        for wf_id in _held_locks(lp, list(seen), stale_after_s, poll_s):
            fw_locks += lp.workflows.update_one({"_id": wf_id, "locked": True}, {"$unset": {"locked": ""}}).modified_count
    # before detect_lostruns: its rerun_fw would wait on a stale lock
    lost_launches, lost_fws, _ = lp.detect_lostruns(expiration_secs=lost_after_s, query={"spec.campaign": campaign}, rerun=True)
    dead = dead_checkouts(lp, campaign, stale_after_s)
    for fw_id in dead:
        lp.rerun_fw(fw_id)
    db.flush()
    return {"claims_released": claims, "locks_released": locks, "fireworks_locks_released": fw_locks,
            "lost_launches": len(lost_launches), "rerun_fireworks": len(lost_fws), "dead_checkouts": len(dead)}


def _as_utc(value: Any) -> datetime | None:
    """FireWorks writes ``updated_on`` as a datetime (its check-out) or an ISO string (its upserts)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def dead_checkouts(lp: Any, campaign: str, older_than_s: float) -> list[int]:
    """Fireworks a rocket checked out (RESERVED) and died before writing their launch; fw_ids, sorted.

    FireWorks' check-out first marks the Firework RESERVED, then writes its launch and marks it
    RUNNING. A rocket that dies, or whose command meets a restarting database, in between leaves
    a RESERVED Firework with no launch of its own: no ping to go stale, so ``detect_lostruns``
    never sees it, and no rocket picks it up again (they take READY ones). Left alone for
    ``older_than_s`` seconds (a live check-out takes milliseconds), it is dead. Reservations
    of ``qlaunch -r`` (a RESERVED launch waiting in the queue) and the batched rocket's claims
    (their own field, released by age in ``release_stale``) are not touched.
    """
    from amdflow.batch_launch import CLAIM

    cutoff = utcnow().timestamp() - older_than_s
    out = []
    for fw in lp.fireworks.find({"spec.campaign": campaign, "state": "RESERVED", CLAIM: {"$exists": False}},
                                {"fw_id": 1, "updated_on": 1}):
        at = _as_utc(fw.get("updated_on"))
        if at is None or at.timestamp() >= cutoff:
            continue
        if lp.launches.find_one({"fw_id": fw["fw_id"], "state": "RESERVED"}, {"_id": 1}) is None:
            out.append(int(fw["fw_id"]))
    return sorted(out)


def _templates_text(cfg: CampaignConfig) -> str:
    parts = []
    for t in cfg.templates:
        if t.source == "aflow":
            parts.append(f"AFLOW library ({len(t.prototypes)} prototypes)" if t.prototypes else "AFLOW library (all that fit)")
        elif t.source == "folder":
            parts.append(f"folder {t.path}")
        elif t.source == "random":
            which = ", ".join(t.compositions) if t.compositions else f"every formula up to {t.max_atoms} atoms"
            parts.append(f"random search ({which}; {t.n_structures} starts each, seed {t.seed})")
        else:
            parts.append(f"Materials Project {', '.join(t.chemsys or t.material_ids or [])}")
    return "; ".join(parts)


def _references_text(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> str:
    """Each element's reference on the final hull, named ('C: graphite (P6_3/mmc) [ground state; MP mp-48],
    -9.22 eV/atom'), and what was relaxed for it."""
    from amdflow.stages import chosen_references, reference_name

    chosen = chosen_references(db, run_type, cfg.elements)
    tried = ", ".join(reference_name(cfg.elements[0], p).split(" [")[0] if p != "ground_state" else "ground state"
                      for p in cfg.relax.reference_structures())
    parts = [f"{el}: {chosen[el]['name']}, {chosen[el]['energy_per_atom']:.4f} eV/atom" if el in chosen else f"{el}: not relaxed yet"
             for el in cfg.elements]
    return f"{'; '.join(parts)} (lowest of: {tried})"


def write_campaign_report(db: AmdflowDB, cfg: CampaignConfig) -> tuple[Path, dict[str, Any]]:
    """Rebuild the hull, refresh promising/ and the plots, and write ``report.html``; returns (path, analyze summary)."""
    from amdflow.report.funnel import PARITY_FILE, funnel_stages, hit_rate, parity_png
    from amdflow.report.html import ReportData, write_report
    from amdflow.stages import PLOT_FILE, PLOT_HTML, analyze_stage, campaign_thermo, promising_rows

    summary = analyze_stage(db, cfg.name, plot=True)
    doc = db.campaigns.find_one({"name": cfg.name}, {"_id": 0})
    status = campaign_status(db, cfg.name)
    thermo = campaign_thermo(db, cfg, doc["run_type"])
    rows, _ = promising_rows(db, cfg, thermo)
    known = sorted((t for t in thermo if t.get("kind") == "known"), key=lambda t: (t["e_above_hull"], t["formula"]))
    engine_note = (db.tasks.find_one({"run_type": doc["run_type"]}, {"engine_note": 1}) or {}).get("engine_note", "")
    screen = cfg.screen
    known_cfg = cfg.analyze.known_phases
    info = {
        "elements": ", ".join(cfg.elements),
        "templates": _templates_text(cfg),
        "model (CGCNN)": f"{screen.checkpoint} (sha256 {str(doc.get('model_id') or '?')[:12]})",
        "screening": f"{screen.mode}: predicted E_f <= {screen.max_formation_energy_per_atom} eV/atom"
                     + (f", <= {screen.max_e_above_hull} eV/atom above the hull" if screen.mode == "hull" else "")
                     + (f", top {screen.top_k} per formula" if screen.mode == "top_k" else ""),
        "relaxation engine": f"{cfg.relax.engine}" + (f" ({engine_note})" if engine_note else ""),
        "run type": doc["run_type"],
        "elemental references": _references_text(db, cfg, doc["run_type"]),
        "known phases": "none" if known_cfg is None else f"{known_cfg.source} ({known_cfg.energies}), {len(known)} on this hull",
        "promising": f"e_above_hull <= {cfg.analyze.promising_e_above_hull} eV/atom -> {Path(cfg.output_dir or '.') / 'promising'}",
        "amdflow version": doc.get("code_version", "?"),
        "settings hash": doc["config_hash"][:16],
        "added": str(doc.get("created_at", ""))[:19],
    }
    counts = {
        "candidates": {k: v for k, v in status["candidates"].items() if v},
        "fireworks": status["fireworks"],
        "references": status["references"],
        "hull": status["thermo"],
    }
    out = Path(cfg.output_dir or ".")
    funnel = status.get("funnel") or {}
    if funnel:
        info["funnel (ML potential)"] = (f"{cfg.funnel.engine} {cfg.funnel.model or ''} ({funnel['run_type']}): cut "
                                         f"{cfg.funnel.max_e_above_hull} eV/atom above its own hull"
                                         + (f", top {cfg.funnel.top_k_per_formula} per formula" if cfg.funnel.top_k_per_formula else ""))
    points = parity_points(db, cfg, doc)
    threshold = cfg.analyze.promising_e_above_hull
    parity = parity_png(points, out / PARITY_FILE, doc["run_type"], funnel.get("run_type"), threshold)
    labels = {"E_f predicted": f"CGCNN ({screen.checkpoint})", "E_f, E above hull (final)": f"{cfg.relax.engine} ({doc['run_type']})"}
    if funnel:
        labels["E above ML hull"] = f"{cfg.funnel.engine} {cfg.funnel.model or ''} ({funnel['run_type']})"
    data = ReportData(
        campaign=cfg.name, chemsys=cfg.chemsys, summary=info, counts=counts, rows=rows,
        promising_threshold=threshold, known=known,
        plot_png=PLOT_FILE if summary.get("plot") else None, plot_html=PLOT_HTML if summary.get("plot_html") else None,
        plot_note=summary.get("plot_note", ""), stages=funnel_stages(status["candidates"], funnel or None),
        hit_rate=hit_rate(points, threshold), final_relaxations=len(points),
        parity_png=PARITY_FILE if parity else None, energy_labels=labels, random_search=status.get("random_search") or [],
        rounds=(status.get("rounds") or {}).get("history") or [],
    )
    return write_report(out, data), summary


def parity_points(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any]) -> list[Any]:
    """Every candidate of the campaign on its final hull, with its ML and CGCNN energies (the report's parity data)."""
    from amdflow.report.funnel import ParityPoint

    # candidate_id tested here, not with $ne in the query: an index serves (run_type, hull_chemsys, campaign) exactly
    final = {t["candidate_id"]: t for t in db.thermo.find(
        {"campaign": cfg.name, "hull_chemsys": cfg.chemsys, "run_type": doc["run_type"]},
        {"_id": 0, "candidate_id": 1, "formula": 1, "e_above_hull": 1, "formation_energy_per_atom": 1}) if t.get("candidate_id")}
    out = []
    for c in db.candidates.find({"candidate_id": {"$in": sorted(final)}},
                                {"_id": 0, "candidate_id": 1, "prediction.formation_energy_per_atom": 1, "funnel.e_above_hull": 1}):
        t = final[c["candidate_id"]]
        out.append(ParityPoint(c["candidate_id"], t["formula"], t["e_above_hull"], t["formation_energy_per_atom"],
                               (c.get("funnel") or {}).get("e_above_hull"),
                               (c.get("prediction") or {}).get("formation_energy_per_atom")))
    return sorted(out, key=lambda p: p.candidate_id)
