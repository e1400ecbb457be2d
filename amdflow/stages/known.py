"""Known phases: import them, and relax them the campaign's way (relax mode)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pymatgen.core import Structure
from pymongo import ReplaceOne

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB, bulk_write
from amdflow.errors import AmdflowError
from amdflow.schemas import ReferenceDoc, utcnow
from amdflow.stages.common import load_campaign_config
from amdflow.stages.relax import level_engine
from amdflow.stages.tasks import task_doc
from amdflow.thermo.corrections import energy_on_scale


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
    if as_is:  # their energies join the hull of spec.run_type: put them on that hull's energy scale
        scale = _as_is_scale(cfg, str(spec.run_type))
        for (_, entry), d in zip(entries, docs, strict=True):
            d["energy_per_atom"] = energy_on_scale(entry, scale)
            d["energy_scale"] = scale
    else:
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


def _as_is_scale(cfg: CampaignConfig, run_type: str) -> str:
    """The energy scale ('mp2020' or 'uncorrected') of the campaign's hull of ``run_type``, or one clear error."""
    from amdflow.errors import ConfigError
    from amdflow.stages.common import funnel_run_type_of, run_type_of
    from amdflow.thermo.corrections import policy_for

    hulls = {run_type_of(cfg): policy_for(cfg.relax.engine.value, cfg.relax)}
    if cfg.funnel.enabled:
        hulls[str(funnel_run_type_of(cfg))] = policy_for(cfg.funnel.engine.value, cfg.funnel)
    if run_type not in hulls:
        raise ConfigError(f"analyze.known_phases.run_type '{run_type}' is none of this campaign's run types "
                          f"({', '.join(hulls)}; `amdflow status` shows them): the phases would join no hull; set it to "
                          "the run type their energies were computed with, or use energies: relax")
    return hulls[run_type].scale


def known_reference_id(known_id: str, run_type: str) -> str:
    return f"known-{known_id}-{run_type}"


def relax_known_stage(db: AmdflowDB, campaign: str, known_id: str, env: dict[str, Any] | None = None,
                      level: str = "final") -> str:
    """Relax an imported known phase with the campaign's engine (or, level 'funnel', the funnel's potential)."""
    cfg, _ = load_campaign_config(db, campaign)
    known = db.known.find_one({"known_id": known_id}, {"_id": 0})
    if known is None or not known.get("structure"):
        raise AmdflowError(f"known phase {known_id} not found or without a structure: re-run `amdflow add`")
    engine, settings = level_engine(cfg, level, env)
    structure = Structure.from_dict(known["structure"])
    result = engine.relax(structure)
    task_id = known_reference_id(known_id, engine.run_type)
    task = task_doc("known", task_id, structure, result, engine, cfg, None, None, None, settings=settings, level=level,
                    known_id=known_id, source=known["source"])
    db.tasks.replace_one({"task_id": task_id}, task.to_mongo(), upsert=True)
    db.references.update_one({"ref_id": task_id}, {"$set": {"state": "relaxed", "energy_per_atom": result.energy_per_atom, "task_id": task_id}})
    return task_id
