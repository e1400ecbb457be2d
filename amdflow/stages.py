"""The pipeline stages on the database: what each Firetask (and the CLI) calls.

Each function takes an :class:`~amdflow.db.AmdflowDB`, reads the documents it needs,
calls the pure science functions and writes the outcome back. No FireWorks here: the
Firetasks in :mod:`amdflow.firetasks` translate outcomes into ``FWAction``s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from pymongo import ReplaceOne, UpdateOne

from amdflow import __version__
from amdflow.campaign import CampaignConfig, campaign_from_dict
from amdflow.db import AmdflowDB, bulk_write
from amdflow.errors import AmdflowError
from amdflow.schemas import (
    CampaignDoc,
    CandidateState,
    DedupRecord,
    Prediction,
    ReferenceDoc,
    TaskDoc,
    utcnow,
)
from amdflow.settings import get_settings, resolve_device

logger = logging.getLogger(__name__)

PROMISING_DIR = "promising"
SCREENED_BY_TOP_K = "top_k"  # dedup_stage's answer when the top-k screen removed the candidate
PLOT_FILE = "phase_diagram.png"
PLOT_HTML = "phase_diagram.html"


# ---------------------------------------------------------------- campaign documents
def run_type_of(cfg: CampaignConfig) -> str:
    """Run type of a campaign's relax engine (energies comparable only within one)."""
    from amdflow.relax import get_engine

    return get_engine(cfg.relax).run_type


def campaign_doc(cfg: CampaignConfig) -> CampaignDoc:
    return CampaignDoc(
        name=cfg.name,
        chemsys=cfg.chemsys,
        elements=cfg.elements,
        config=cfg.model_dump(mode="json"),
        config_hash=cfg.config_hash(),
        run_type=run_type_of(cfg),
        output_dir=str(cfg.output_dir),
        code_version=__version__,
    )


def load_campaign_config(db: AmdflowDB, name: str) -> tuple[CampaignConfig, dict[str, Any]]:
    doc = db.campaigns.find_one({"name": name}, {"_id": 0})
    if doc is None:
        raise AmdflowError(f"campaign '{name}' is not in the database: add it with `amdflow add CAMPAIGN.yaml`")
    return campaign_from_dict(doc["config"], source=f"campaign '{name}' (stored)"), doc


def _set_state(db: AmdflowDB, candidate_id: str, state: CandidateState, **fields: Any) -> None:
    db.candidates.update_one(
        {"candidate_id": candidate_id},
        {"$set": {"state": state.value, "updated_at": utcnow(), **fields}},
    )


def record_failure(db: AmdflowDB, candidate_id: str, stage: str, err: BaseException) -> None:
    """Mark a candidate failed with a one-line reason (the Firework fizzles too)."""
    msg = f"{stage}: {type(err).__name__}: {err}".replace("\n", " ")[:500]
    _set_state(db, candidate_id, CandidateState.FAILED, error=msg)


def _load_candidate(db: AmdflowDB, candidate_id: str) -> dict[str, Any]:
    doc = db.candidates.find_one({"candidate_id": candidate_id}, {"_id": 0})
    if doc is None:
        raise AmdflowError(f"candidate {candidate_id} is not in the database: was it deleted? re-add the campaign")
    return doc


# ---------------------------------------------------------------- predict
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
    _failpoint_delay("AMDFLOW_FAILPOINT_PREDICT_DELAY_S")  # tests: a batch that is surely mid-run when killed
    docs = list(db.candidates.find({"candidate_id": {"$in": candidate_ids}}, {"_id": 0, "candidate_id": 1, "campaign": 1, "structure": 1}))
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
            passed = bool(energy <= threshold)
            reason = None if passed else f"predicted formation energy {energy:.3f} > {threshold} eV/atom"
            e_hull = None
            if cfg.screen.mode == "hull":
                from amdflow.thermo.hull import predicted_e_above_hull

                formula = Structure.from_dict(d["structure"]).composition.reduced_formula
                e_hull = predicted_e_above_hull(formula, float(energy), phases, cfg.elements)
                if passed and e_hull > cfg.screen.max_e_above_hull:
                    passed, reason = False, f"predicted {e_hull:.3f} eV/atom above the current hull > {cfg.screen.max_e_above_hull}"
            pred = Prediction(formation_energy_per_atom=float(energy), model_id=predictor.model_id,
                              model_name=predictor.checkpoint.name, threshold=threshold, passed=passed,
                              mode=cfg.screen.mode, e_above_hull=e_hull, reason=reason)
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


def top_k_rank(db: AmdflowDB, campaign: str, formula: str, candidate_id: str, energy: float) -> int:
    """How many candidates of the formula that passed the screen rank before this one by (energy, id)."""
    ahead = 0
    for p in db.candidates.find({"campaign": campaign, "formula": formula, "prediction.passed": True, "candidate_id": {"$ne": candidate_id}},
                                {"candidate_id": 1, "prediction.formation_energy_per_atom": 1}):
        if (p["prediction"]["formation_energy_per_atom"], p["candidate_id"]) < (energy, candidate_id):
            ahead += 1
    return ahead


# ---------------------------------------------------------------- claims
CLAIM_STALE_S = 300.0  # a claim older than this belongs to a dead rocket and may be taken over
HULL_CLAIM_STALE_S = 120.0  # hull builds take seconds; a claim this old was left by a dead process


@contextlib.contextmanager
def claim(db: AmdflowDB, key: str, timeout_s: float = 600.0, stale_s: float = CLAIM_STALE_S) -> Iterator[None]:
    """Hold an exclusive claim on ``key`` across processes (MongoDB's unique _id makes the insert atomic).

    A claim older than ``stale_s`` belongs to a dead process and is taken over. Releasing
    is retried for a while, so a database restart during the claim does not leave it
    behind (``amdflow rerun --lost`` also clears stale claims).
    """
    import os
    import random
    import socket
    import time

    from pymongo.errors import DuplicateKeyError, PyMongoError

    locks = db.coll("locks")
    owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32)}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            locks.insert_one({"_id": key, "owner": owner, "at": utcnow()})
            break
        except DuplicateKeyError:
            stale = utcnow().timestamp() - stale_s
            locks.delete_one({"_id": key, "at": {"$lt": datetime.fromtimestamp(stale, UTC)}})
            if time.monotonic() > deadline:
                raise AmdflowError(f"could not claim '{key}' within {timeout_s:.0f} s: is a rocket stuck? "
                                   "`amdflow rerun CAMPAIGN --lost` clears stale claims") from None
            time.sleep(0.02 + random.random() * 0.05)
    try:
        yield
    finally:
        for attempt in range(8):  # about 30 s: a restarting server comes back
            try:
                locks.delete_one({"_id": key, "owner": owner})
                break
            except PyMongoError:
                if attempt == 7:
                    logger.warning("claim %s could not be released (database unreachable); it expires after %.0f s", key, stale_s)
                    break
                time.sleep(0.25 * 2**attempt)


# ---------------------------------------------------------------- dedup
def dedup_stage(db: AmdflowDB, candidate_id: str) -> str | None:
    """Keep one member of each structure family; returns the id duplicated, if any.

    Decisions for one (campaign, formula) are serialized by a claim, so two rockets can
    never both keep members of one family. Inside the claim a candidate first meets the
    family's representatives already decided (the first decided wins), then the rule of
    :func:`amdflow.select.dedup.find_representative` among the lower-energy undecided
    ones. Dedup Fireworks run lowest predicted energy first (``_priority``), so the
    representative is the lowest-energy member whenever the predictions come first.
    """
    doc = _load_candidate(db, candidate_id)
    with claim(db, f"dedup:{doc['campaign']}:{doc['formula']}"):
        return _dedup_decision(db, candidate_id)


def _dedup_decision(db: AmdflowDB, candidate_id: str) -> str | None:
    from amdflow.select.dedup import Peer, find_representative

    doc = _load_candidate(db, candidate_id)
    cfg, _ = load_campaign_config(db, doc["campaign"])
    if not doc.get("prediction"):
        raise AmdflowError(f"candidate {candidate_id} has no prediction: run its predict Firework first")
    if cfg.screen.mode == "top_k":
        energy = doc["prediction"]["formation_energy_per_atom"]
        rank = top_k_rank(db, doc["campaign"], doc["formula"], candidate_id, energy)
        if rank >= cfg.screen.top_k:
            reason = f"rank {rank + 1} of its formula by predicted energy; top_k is {cfg.screen.top_k}"
            _set_state(db, candidate_id, CandidateState.SCREENED_OUT,
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
    _failpoint_delay("AMDFLOW_FAILPOINT_DEDUP_DELAY_S")  # tests widen the read-decide-write window
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
    _set_state(db, candidate_id, CandidateState.DUPLICATE if dup else CandidateState.UNIQUE, dedup=record)
    return dup


def _failpoint_delay(name: str) -> None:
    """Sleep for the seconds in environment variable ``name`` (tests only; unset in production)."""
    import os
    import time

    value = os.environ.get(name)
    if value:
        time.sleep(float(value))


def _decided_unique(db: AmdflowDB, doc: dict[str, Any]) -> set[str]:
    """Ids of the formula's candidates already kept by dedup (representatives)."""
    return {c["candidate_id"] for c in db.candidates.find(
        {"campaign": doc["campaign"], "formula": doc["formula"], "dedup.duplicate_of": None, "dedup.compared": {"$exists": True},
         "state": {"$in": [CandidateState.UNIQUE.value, CandidateState.RELAXED.value, CandidateState.ANALYZED.value]}},
        {"candidate_id": 1})}


# ---------------------------------------------------------------- relax
def _task_doc(kind: str, task_id: str, structure: Structure, result: Any, engine: Any, cfg: CampaignConfig,
              directory: Path | None, candidate_id: str | None = None, campaign: str | None = None,
              **extra: Any) -> TaskDoc:
    comp = result.final_structure.composition
    return TaskDoc(
        task_id=task_id, kind=kind, candidate_id=candidate_id, campaign=campaign,
        formula=comp.reduced_formula, chemsys=comp.chemical_system,
        elements=sorted(el.symbol for el in comp.elements), nsites=len(result.final_structure),
        run_type=engine.run_type, engine=engine.name, engine_note=engine.note,
        input_structure=structure.as_dict(), final_structure=result.final_structure.as_dict(),
        energy=result.energy, energy_per_atom=result.energy_per_atom, converged=result.converged,
        n_steps=result.n_steps, max_force=result.max_force, run_time_s=result.run_time_s,
        settings=cfg.relax.model_dump(mode="json"), details=result.details,
        dir_name=str(directory) if directory else result.details.get("dir_name"), **extra,
    )


def relax_candidate_stage(db: AmdflowDB, candidate_id: str, directory: Path | None = None, env: dict[str, Any] | None = None) -> str:
    """Relax a candidate with the campaign's engine; writes a task doc, returns its id. ``env``: the FWorker's env."""
    from amdflow.relax import get_engine
    from amdflow.relax.base import WalltimeStop

    doc = _load_candidate(db, candidate_id)
    cfg, _ = load_campaign_config(db, doc["campaign"])
    engine = get_engine(cfg.relax, resolve_device(get_settings()), env)
    structure = Structure.from_dict(doc["structure"])
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
    task = _task_doc("candidate", task_id, structure, result, engine, cfg, directory, candidate_id, doc["campaign"])
    db.tasks.replace_one({"task_id": task_id}, task.to_mongo(), upsert=True)
    _set_state(db, candidate_id, CandidateState.RELAXED, task_id=task_id, error=None)
    if resume:
        db.candidates.update_one({"candidate_id": candidate_id}, {"$unset": {"resume": ""}})
    return task_id


def reference_id(element: str, prototype: str, run_type: str) -> str:
    return f"ref-{element}-{prototype}-{run_type}"


def reference_structure(element: str, prototype: str) -> Structure:
    """The AFLOW elemental prototype with ``element``, scaled to its atomic volume.

    ``prototype`` is a one-element AFLOW label or a short name (fcc, bcc, ...): reference
    Fireworks added before short names were normalised carry the short name.
    """
    from amdflow.campaign import elemental_prototype_label
    from amdflow.generate.substitute import substitute
    from amdflow.generate.templates import aflow_structure

    try:
        label = elemental_prototype_label(prototype)
    except ValueError as err:
        raise AmdflowError(f"elemental reference of {element}: {err}") from None
    s = aflow_structure(label)
    return substitute(s, {s[0].specie.symbol: element}, scale_volume=True)


def relax_reference_stage(db: AmdflowDB, campaign: str, element: str, prototype: str, env: dict[str, Any] | None = None) -> str:
    """Relax one elemental reference phase the way candidates are relaxed (same engine, same settings)."""
    from amdflow.relax import get_engine

    cfg, _ = load_campaign_config(db, campaign)
    engine = get_engine(cfg.relax, resolve_device(get_settings()), env)
    structure = reference_structure(element, prototype)
    result = engine.relax(structure)
    ref_id = reference_id(element, prototype, engine.run_type)
    task = _task_doc("reference", ref_id, structure, result, engine, cfg, None, None, None)
    db.tasks.replace_one({"task_id": ref_id}, task.to_mongo(), upsert=True)
    db.references.update_one(
        {"ref_id": ref_id},
        {"$set": {"state": "relaxed", "energy_per_atom": result.energy_per_atom, "task_id": ref_id}},
    )
    return ref_id


# ---------------------------------------------------------------- known phases
@dataclass
class KnownReport:
    """What an import of known phases did."""

    read: int = 0
    imported: int = 0  # new or changed known docs
    kept: int = 0  # for the campaign's elements, after the own-hull filter
    note: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    pending: list[ReferenceDoc] = field(default_factory=list)  # relax mode: relaxations to add


def import_known_phases(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> KnownReport:
    """Import the campaign's known phases (idempotent); relax mode: the relaxations still to run."""
    from amdflow.campaign import KnownEnergies
    from amdflow.thermo import known as kn

    report = KnownReport()
    spec = cfg.analyze.known_phases
    if spec is None:
        return report
    if spec.source == "folder":
        read = kn.read_entry_folder(spec.path)
        label = f"folder:{spec.path.name}"
    else:
        read = kn.mp_entries(cfg.chemsys)
        label = "mp"
    report.read, report.skipped = len(read.entries), read.skipped
    entries = kn.for_elements(read.entries, cfg.elements)
    entries, report.note = kn.within_own_hull(entries, spec.max_e_above_hull)
    as_is = spec.energies == KnownEnergies.AS_IS
    docs = [kn.known_doc(label, key, entry, spec.run_type if as_is else None) for key, entry in entries]
    if not as_is:
        kn.require_structures(docs)
    report.kept = len(docs)
    for d in docs:  # what decides "changed" (Mongo gives tuples back as lists: compare hashes of JSON)
        d["content_hash"] = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
    stored = {d["known_id"]: d.get("content_hash") for d in db.known.find({"known_id": {"$in": [d["known_id"] for d in docs]}},
                                                                          {"known_id": 1, "content_hash": 1})}
    now = utcnow()
    changed = [d for d in docs if stored.get(d["known_id"]) != d["content_hash"]]
    bulk_write(db.known, [ReplaceOne({"known_id": d["known_id"]}, {**d, "created_at": now}, upsert=True) for d in changed])
    report.imported = len(changed)
    if not as_is:
        wanted = [ReferenceDoc(ref_id=known_reference_id(d["known_id"], run_type), element=d["formula"],
                               prototype=d["known_id"], run_type=run_type, kind="known") for d in docs]
        have = {r["ref_id"] for r in db.references.find({"ref_id": {"$in": [w.ref_id for w in wanted]}}, {"ref_id": 1})}
        report.pending = [w for w in wanted if w.ref_id not in have]
    return report


def known_reference_id(known_id: str, run_type: str) -> str:
    return f"known-{known_id}-{run_type}"


def relax_known_stage(db: AmdflowDB, campaign: str, known_id: str, env: dict[str, Any] | None = None) -> str:
    """Relax an imported known phase with the campaign's engine and settings (task kind 'known')."""
    from amdflow.relax import get_engine

    cfg, _ = load_campaign_config(db, campaign)
    known = db.known.find_one({"known_id": known_id}, {"_id": 0})
    if known is None or not known.get("structure"):
        raise AmdflowError(f"known phase {known_id} not found or without a structure: re-run `amdflow add`")
    engine = get_engine(cfg.relax, resolve_device(get_settings()), env)
    structure = Structure.from_dict(known["structure"])
    result = engine.relax(structure)
    task_id = known_reference_id(known_id, engine.run_type)
    task = _task_doc("known", task_id, structure, result, engine, cfg, None, None, None,
                     known_id=known_id, source=known["source"])
    db.tasks.replace_one({"task_id": task_id}, task.to_mongo(), upsert=True)
    db.references.update_one({"ref_id": task_id}, {"$set": {"state": "relaxed", "energy_per_atom": result.energy_per_atom, "task_id": task_id}})
    return task_id


def pending_references(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> list[ReferenceDoc]:
    """Reference docs this campaign needs that are not in the database yet."""
    wanted = [
        ReferenceDoc(ref_id=reference_id(el, proto, run_type), element=el, prototype=proto, run_type=run_type)
        for el in sorted(cfg.elements)
        for proto in cfg.relax.reference_prototypes
    ]
    have = {d["ref_id"] for d in db.references.find({"ref_id": {"$in": [w.ref_id for w in wanted]}}, {"ref_id": 1})}
    return [w for w in wanted if w.ref_id not in have]


# ---------------------------------------------------------------- training data
def campaign_training_data(db: AmdflowDB, campaign: str) -> tuple[list[str], list[dict[str, Any]], list[float]]:
    """(material ids, relaxed structures as dicts, formation energies in eV/atom) of a campaign's hull.

    Every material on the campaign's hull of its run type: relaxed candidates and the
    elemental reference phases, with formation energies against the references computed
    the same way (the thermo collection).
    """
    cfg, doc = load_campaign_config(db, campaign)
    thermo = {t["material_id"]: t["formation_energy_per_atom"]
              for t in db.thermo.find({"hull_chemsys": cfg.chemsys, "run_type": doc["run_type"]},
                                      {"material_id": 1, "formation_energy_per_atom": 1})}
    if not thermo:
        raise AmdflowError(f"campaign '{campaign}' has no hull yet: run it (`amdflow run`) before training on it")
    ids, structures, targets = [], [], []
    for task in db.tasks.find({"task_id": {"$in": sorted(thermo)}}, {"_id": 0, "task_id": 1, "final_structure": 1}).sort("task_id", 1):
        ids.append(task["task_id"])
        structures.append(task["final_structure"])
        targets.append(thermo[task["task_id"]])
    return ids, structures, targets


# ---------------------------------------------------------------- analyze
def analyze_stage(db: AmdflowDB, campaign: str, candidate_id: str | None = None, plot: bool = True,
                  always_refresh: bool = True) -> dict[str, Any]:
    """Hull of the campaign's system (incremental builder), candidates' hull summaries, refreshed outputs.

    ``always_refresh=False`` skips rewriting promising/ and the plots when the build changed
    nothing and they exist (a campaign-level analyze after every candidate's own).
    """
    from amdflow.builders.thermo import ThermoBuilder, run_builder

    cfg, doc = load_campaign_config(db, campaign)
    run_type = doc["run_type"]
    builder = ThermoBuilder.from_db(db, run_types=[run_type], chemsys=[cfg.chemsys],
                                    include_unconverged=cfg.analyze.include_unconverged)
    # One build of a system at a time: a builder that waited finds the other's record and,
    # when its own task was included, has nothing to do (concurrent analyze Fireworks batch up).
    with claim(db, f"hull:{run_type}:{cfg.chemsys}", stale_s=HULL_CLAIM_STALE_S):
        _failpoint_delay("AMDFLOW_FAILPOINT_HULL_DELAY_S")  # tests: a rocket surely killed while it holds the hull claim
        run_builder(builder)
    # Hull summaries on the candidate docs: the candidate itself (or, campaign-level, every
    # relaxed one: one analyzed before its references were relaxed is placed when they are),
    # and every candidate of the campaign whose hull position this build changed.
    if candidate_id is not None:
        ids = {candidate_id}
    else:
        ids = {c["candidate_id"] for c in db.candidates.find({"campaign": campaign, "state": CandidateState.RELAXED.value}, {"candidate_id": 1})}
    ids |= {d["candidate_id"] for d in builder.changed
            if d.get("candidate_id") and d.get("campaign") == campaign and d["hull_chemsys"] == cfg.chemsys}
    now = utcnow()
    ops = [UpdateOne({"candidate_id": t["candidate_id"],
                      "state": {"$in": [CandidateState.RELAXED.value, CandidateState.ANALYZED.value]}},
                     {"$set": {"state": CandidateState.ANALYZED.value, "updated_at": now, "thermo": {
                         "formation_energy_per_atom": t["formation_energy_per_atom"], "e_above_hull": t["e_above_hull"],
                         "e_above_known_hull": t.get("e_above_known_hull"), "is_stable": t["is_stable"]}}})
           for t in db.thermo.find({"candidate_id": {"$in": sorted(ids)}, "hull_chemsys": cfg.chemsys, "run_type": run_type}, {"_id": 0})]
    bulk_write(db.candidates, ops)
    # outputs last: a failed write (disk full) loses nothing that is in the database
    out = Path(cfg.output_dir or ".")
    if always_refresh or builder.changed or not (out / PROMISING_DIR).exists():
        summary = refresh_outputs(db, cfg, run_type, plot=plot)
    else:
        q = {"hull_chemsys": cfg.chemsys, "run_type": run_type}
        summary = {"thermo": db.thermo.count_documents(q), "stable": db.thermo.count_documents({**q, "is_stable": True}),
                   "promising": db.thermo.count_documents({**q, "campaign": cfg.name, "candidate_id": {"$ne": None},
                                                           "e_above_hull": {"$lte": cfg.analyze.promising_e_above_hull}}),
                   "unchanged": True}
    if candidate_id is not None and not ops:
        logger.info("candidate %s: no hull yet (elemental references pending)", candidate_id)
    return summary


def promising_rows(db: AmdflowDB, cfg: CampaignConfig, thermo: list[dict[str, Any]]) -> tuple[list[Any], dict[str, Structure]]:
    """The campaign's candidates at most ``promising_e_above_hull`` above the hull, best first, with structures."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from amdflow.report import PromisingRow

    threshold = cfg.analyze.promising_e_above_hull
    chosen = [t for t in thermo if t.get("campaign") == cfg.name and t.get("candidate_id") and t["e_above_hull"] <= threshold]
    chosen.sort(key=lambda t: (t["e_above_hull"], t["formation_energy_per_atom"], t["material_id"]))
    tasks = {t["task_id"]: t for t in db.tasks.find({"task_id": {"$in": [c["material_id"] for c in chosen]}}, {"_id": 0, "task_id": 1, "final_structure": 1})}
    cands = {c["candidate_id"]: c for c in db.candidates.find({"candidate_id": {"$in": [c["candidate_id"] for c in chosen]}}, {"_id": 0, "candidate_id": 1, "template": 1, "prediction": 1})}
    rows, structures = [], {}
    for t in chosen:
        s = Structure.from_dict(tasks[t["material_id"]]["final_structure"])
        structures[t["candidate_id"]] = s
        cand = cands.get(t["candidate_id"], {})
        try:
            sg = SpacegroupAnalyzer(s, symprec=0.1).get_space_group_symbol()
        except Exception:  # spglib can fail on distorted cells; the symbol is cosmetic
            sg = "?"
        known = t.get("e_above_known_hull")
        rows.append(PromisingRow(
            candidate_id=t["candidate_id"], formula=t["formula"], spacegroup=sg,
            formation_energy_per_atom=round(t["formation_energy_per_atom"], 6), e_above_hull=round(t["e_above_hull"], 6),
            e_above_known_hull=None if known is None else round(known, 6),
            is_stable=t["is_stable"],
            decomposes_to=" + ".join(f"{d['fraction']:.3f} {d['formula']}" for d in t["decomposes_to"]),
            predicted_formation_energy_per_atom=(cand.get("prediction") or {}).get("formation_energy_per_atom"),
            template=f"{cand.get('template', {}).get('source')}:{cand.get('template', {}).get('template_id')}",
            material_id=t["material_id"],
        ))
    return rows, structures


def campaign_thermo(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> list[dict[str, Any]]:
    """Thermo docs of the campaign's hull system (its run type only)."""
    return list(db.thermo.find({"hull_chemsys": cfg.chemsys, "run_type": run_type}, {"_id": 0}))


def refresh_outputs(db: AmdflowDB, cfg: CampaignConfig, run_type: str, plot: bool = True) -> dict[str, Any]:
    """Rewrite promising/ (nothing stale survives) and the phase-diagram plots from the thermo collection."""
    from amdflow.report import PlotPoint, plot_phase_diagram, write_promising

    out = Path(cfg.output_dir or ".")
    thermo = campaign_thermo(db, cfg, run_type)
    if not thermo:
        return {"thermo": 0, "promising": 0, "plot": None}
    rows, structures = promising_rows(db, cfg, thermo)
    write_promising(out / PROMISING_DIR, rows, structures)
    summary: dict[str, Any] = {"thermo": len(thermo), "promising": len(rows), "stable": sum(t["is_stable"] for t in thermo),
                               "plot": None, "plot_html": None}
    if plot:
        points = [PlotPoint.from_thermo(t) for t in thermo]
        files = plot_phase_diagram(points, cfg.elements, out / PLOT_FILE, out / PLOT_HTML, title=f"{cfg.name} ({run_type})",
                                   max_e_above_hull=cfg.analyze.plot_max_e_above_hull)
        summary.update(plot=str(files.png) if files.png else None, plot_html=str(files.html) if files.html else None,
                       plot_note=files.note)
    return summary
