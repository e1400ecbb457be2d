"""ThermoBuilder: relaxed tasks (and imported known phases) -> hull documents per chemical system.

A *hull system* is a chemical system whose PhaseDiagram is built from every entry of
that run type in the system or any of its subsystems (elemental references included).
The systems built are every chemical system of two or more elements among the entries,
those asked for, and every system built before; the system set follows from the data,
so an incremental build and a build from scratch agree. Each material gets one
``thermo`` doc per hull system it belongs to (Al-Ni phases in Al-Ni and in Al-Fe-Ni,
with the same e_above_hull: a face of a hull is the hull of the face), keyed by
(material_id, hull_chemsys); run types are never mixed.

Incremental: ``thermo_builds`` keeps, per (run type, hull system), a digest of its
sources: per chemical system, the number of entries and the newest ``created_at``. A
system is rebuilt only when that digest changed, so a new task in Ce-In rebuilds Ce-In
and every stored super-system (Ce-Fe-In, ...) and nothing else; a task replaced, added
late with an old time stamp, or deleted changes the count or the time and is seen too.
The digest comes from one aggregation per run type, so the check costs no document reads.

Runs with ``mrun`` (the builder is MSONable: give it MongoStores) and from
``amdflow hull`` / the analyze stage (:func:`run_builder`, on the LaunchPad's own client).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from maggma.core import Builder, Store
from pymatgen.analysis.phase_diagram import PhaseDiagramError
from pymongo import ReplaceOne

from amdflow.db import bulk_write
from amdflow.errors import AmdflowError
from amdflow.schemas import ThermoDoc, utcnow
from amdflow.thermo.hull import EntryKind, HullEntry, hull_analysis, subsystems

logger = logging.getLogger(__name__)

TASK_FIELDS = ["task_id", "formula", "chemsys", "energy_per_atom", "kind", "candidate_id", "campaign", "run_type",
               "converged", "known_id", "source", "engine", "level", "correction_scheme"]
KNOWN_FIELDS = ["known_id", "formula", "chemsys", "energy_per_atom", "run_type", "source", "source_id", "energy_scale"]


class MixedHullError(AmdflowError):
    """One hull's entries were computed by different engines or carry different correction schemes (never allowed)."""


def check_one_scale(run_type: str, system: str, tasks: list[dict[str, Any]], known: list[dict[str, Any]]) -> None:
    """Raise :class:`MixedHullError` unless every entry of a hull is on one energy scale: one engine, one level, one
    correction scheme among the tasks, and imported known phases on that scheme's scale.

    Run types already keep these apart (each names its engine and scheme); this is the check that a
    task written under the wrong run type, by a bug or by hand, cannot slip an ML energy into a DFT
    hull or a corrected energy into an uncorrected one unseen.
    """
    from amdflow.thermo.corrections import SCALE, CorrectionScheme

    kinds = {(d.get("engine"), d.get("level", "final"), d.get("correction_scheme")) for d in tasks if "engine" in d}
    if len(kinds) > 1:
        shown = ", ".join(f"{e} ({lv}, correction {c})" for e, lv, c in sorted(kinds, key=str))
        raise MixedHullError(f"hull {system} ({run_type}) holds energies of {shown}: one hull takes one engine and one "
                             "correction scheme; delete the tasks written under the wrong run type")
    schemes = {c for _, _, c in kinds if c}
    scales = {d["energy_scale"] for d in known if d.get("energy_scale")}
    if schemes and scales and scales != {SCALE[CorrectionScheme(next(iter(schemes)))]}:
        raise MixedHullError(f"hull {system} ({run_type}): known phases on the {', '.join(sorted(scales))} scale join tasks "
                             f"corrected by {next(iter(schemes))}: re-run `amdflow add` to import them on the hull's scale")
KNOWN_PREFIX = "known:"  # digest keys of imported known phases, beside the tasks' chemsys keys


def _collection(store: Store) -> Any:
    """The pymongo (or mongomock) collection behind a maggma store."""
    coll = getattr(store, "_coll", None)
    if coll is None:
        store.connect()
        coll = store._collection
    return coll


def source_digest(coll: Any, run_type: str, time_field: str = "created_at", extra: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """{chemsys: [number of entries, newest time stamp as ISO text]} of one run type (one aggregation)."""
    match = {"run_type": run_type, **(extra or {})}
    pipeline = [{"$match": match}, {"$group": {"_id": "$chemsys", "n": {"$sum": 1}, "last": {"$max": f"${time_field}"}}}]
    out = {}
    for row in coll.aggregate(pipeline):
        last = row.get("last")
        out[row["_id"]] = [int(row["n"]), last.isoformat() if hasattr(last, "isoformat") else str(last)]
    return out


def hull_entries(tasks: list[dict[str, Any]], known: list[dict[str, Any]], include_unconverged: bool = False) -> list[HullEntry]:
    """Hull entries from task docs and imported known-phase docs.

    Unconverged relaxations are placed on the hull but do not shape it unless
    ``include_unconverged``.
    """
    entries = []
    for d in tasks:
        kind = EntryKind(d.get("kind", "candidate"))
        in_hull = include_unconverged or d.get("converged", True) is not False
        entries.append(HullEntry(d["task_id"], d["formula"], float(d["energy_per_atom"]), kind=kind, in_hull=in_hull))
    for d in known:
        entries.append(HullEntry(d["known_id"], d["formula"], float(d["energy_per_atom"]), kind=EntryKind.KNOWN))
    return entries


def build_system(item: dict[str, Any], include_unconverged: bool = False) -> dict[str, Any]:
    """Pure: the thermo docs and the build record of one hull system (no database access)."""
    system, run_type = item["chemsys"], item["run_type"]
    now = utcnow()
    record: dict[str, Any] = {"run_type": run_type, "hull_chemsys": system, "sources": item["sources"], "built_at": now,
                              "n_entries": len(item["tasks"]) + len(item["known"]), "error": None}
    tasks = {d["task_id"]: d for d in item["tasks"]}
    known = {d["known_id"]: d for d in item["known"]}
    check_one_scale(run_type, system, item["tasks"], item["known"])  # raises: never a mixed hull, never quietly
    entries = hull_entries(item["tasks"], item["known"], include_unconverged)
    try:
        results = hull_analysis(entries, system.split("-"))
    except (AmdflowError, PhaseDiagramError, ValueError) as err:
        logger.info("hull %s (%s) not built: %s", system, run_type, err)
        record["error"] = str(err)
        return {"docs": [], "build": record}
    docs = []
    for r in results:
        src = tasks.get(r.entry_id) or known[r.entry_id]
        docs.append(ThermoDoc(
            material_id=r.entry_id, candidate_id=src.get("candidate_id"), campaign=src.get("campaign"),
            kind=r.kind.value, source=src.get("source"), formula=r.formula, chemsys=src["chemsys"],
            hull_chemsys=system, run_type=run_type, energy_per_atom=r.energy_per_atom,
            formation_energy_per_atom=r.formation_energy_per_atom, e_above_hull=r.e_above_hull,
            e_above_known_hull=r.e_above_known_hull, is_stable=r.is_stable, in_hull=r.in_hull,
            decomposes_to=r.decomposes_to, built_at=now,
        ).to_mongo())
    record["n_stable"] = sum(d["is_stable"] for d in docs)
    return {"docs": docs, "build": record}


class ThermoBuilder(Builder):
    """Builds ``thermo`` (and its build records, ``builds``) from ``tasks`` and optional ``known`` phases.

    Parameters
    ----------
    tasks, thermo, builds:
        Stores of relaxed task docs, hull docs and build records.
    known:
        Optional store of imported known phases whose energies are used as they are
        (``known_id``, formula, chemsys, energy_per_atom, run_type, created_at).
    run_types:
        Only these run types (default: every run type among the sources).
    chemsys:
        Only these hull systems (default: every system present plus every stored one).
    full:
        Rebuild every selected system, changed or not.
    include_unconverged:
        Let unconverged relaxations shape the hull (default: placed on it only).
    """

    def __init__(self, tasks: Store, thermo: Store, builds: Store, known: Store | None = None,
                 run_types: list[str] | None = None, chemsys: list[str] | None = None, full: bool = False,
                 include_unconverged: bool = False, **kwargs: Any) -> None:
        self.tasks = tasks
        self.thermo = thermo
        self.builds = builds
        self.known = known
        self.run_types = run_types
        self.chemsys = chemsys
        self.full = full
        self.include_unconverged = include_unconverged
        self.rebuilt: list[tuple[str, str]] = []  # (run type, hull system) of every system built
        self.changed: list[dict[str, Any]] = []  # thermo docs written (new or changed values)
        self.superseded: list[tuple[str, str]] = []  # systems whose sources changed during their build
        sources = [tasks] + ([known] if known is not None else [])
        super().__init__(sources=sources, targets=[thermo, builds], **kwargs)

    @classmethod
    def from_db(cls, db: Any, **kwargs: Any) -> ThermoBuilder:
        """A builder over an :class:`~amdflow.db.AmdflowDB`'s collections (the LaunchPad's client)."""
        from maggma.stores import MongoStore

        return cls(MongoStore.from_collection(db.tasks), MongoStore.from_collection(db.thermo),
                   MongoStore.from_collection(db.thermo_builds), known=MongoStore.from_collection(db.known), **kwargs)

    def ensure_indexes(self) -> None:
        self.tasks.ensure_index("run_type")
        self.tasks.ensure_index("chemsys")
        self.thermo.ensure_index("material_id")
        self.thermo.ensure_index("hull_chemsys")
        self.builds.ensure_index("hull_chemsys")

    # ------------------------------------------------------------ what to build
    def _run_types(self) -> list[str]:
        if self.run_types:
            return list(self.run_types)
        found = set(_collection(self.tasks).distinct("run_type"))
        if self.known is not None:
            found |= set(_collection(self.known).distinct("run_type"))
        return sorted(found)

    def _digest(self, run_type: str) -> dict[str, list[Any]]:
        digest = source_digest(_collection(self.tasks), run_type)
        if self.known is not None:
            digest.update({KNOWN_PREFIX + k: v for k, v in source_digest(_collection(self.known), run_type).items()})
        return digest

    def plan(self) -> list[dict[str, Any]]:
        """The (run type, system, sources digest) of every system that needs a build."""
        todo = []
        builds = _collection(self.builds)
        for run_type in self._run_types():
            digest = self._digest(run_type)
            stored = {b["hull_chemsys"]: b.get("sources") for b in builds.find({"run_type": run_type}, {"hull_chemsys": 1, "sources": 1})}
            present = {k.removeprefix(KNOWN_PREFIX) for k in digest if "-" in k}
            systems = set(self.chemsys) if self.chemsys else present | set(stored)
            for system in sorted(systems):
                subs = subsystems(system)
                sources = {k: v for k, v in digest.items() if k.removeprefix(KNOWN_PREFIX) in subs}
                if not sources:
                    continue
                if self.full or stored.get(system) != sources:
                    todo.append({"run_type": run_type, "chemsys": system, "sources": sources})
        return todo

    def _sources_now(self, run_type: str, system: str) -> dict[str, list[Any]]:
        subs = subsystems(system)
        digest = source_digest(_collection(self.tasks), run_type, extra={"chemsys": {"$in": subs}})
        if self.known is not None:
            digest.update({KNOWN_PREFIX + k: v for k, v in
                           source_digest(_collection(self.known), run_type, extra={"chemsys": {"$in": subs}}).items()})
        return digest

    def get_items(self) -> Iterator[dict[str, Any]]:
        for job in self.plan():
            subs = subsystems(job["chemsys"])
            query = {"run_type": job["run_type"], "chemsys": {"$in": subs}}
            tasks = list(_collection(self.tasks).find(query, {"_id": 0, **dict.fromkeys(TASK_FIELDS, 1)}))
            known = []
            if self.known is not None:
                known = list(_collection(self.known).find(query, {"_id": 0, **dict.fromkeys(KNOWN_FIELDS, 1)}))
            yield {**job, "tasks": tasks, "known": known}

    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return build_system(item, self.include_unconverged)

    def update_targets(self, items: list[dict[str, Any]]) -> None:
        """Write only the thermo docs whose values changed, delete those of vanished materials, record the build.

        A new phase usually moves few others on the hull, so an incremental build writes a
        handful of documents, not the whole system (measured in scripts/bench_hull.py).
        """
        thermo, builds = _collection(self.thermo), _collection(self.builds)
        for item in items:
            record = item["build"]
            key = {"run_type": record["run_type"], "hull_chemsys": record["hull_chemsys"]}
            if self._sources_now(record["run_type"], record["hull_chemsys"]) != record["sources"]:
                # New entries arrived while this system was being built: a result for an older
                # snapshot must not overwrite a newer one. The analyze Firework that follows
                # every new task builds the newer snapshot.
                logger.info("hull %s (%s): sources changed during the build; left to the next build",
                            record["hull_chemsys"], record["run_type"])
                self.superseded.append((record["run_type"], record["hull_chemsys"]))
                continue
            stored = {d["material_id"]: d for d in thermo.find(key, {"_id": 0})}
            new = {d["material_id"]: d for d in item["docs"]}
            changed = [d for mid, d in new.items() if mid not in stored or not same_values(stored[mid], d)]
            bulk_write(thermo, [ReplaceOne({"material_id": d["material_id"], "hull_chemsys": d["hull_chemsys"]}, d, upsert=True)
                                for d in changed])
            # Materials no longer in the system (a task deleted) leave no stale doc behind.
            gone = sorted(set(stored) - set(new))
            if gone:
                thermo.delete_many({**key, "material_id": {"$in": gone}})
            record["n_written"] = len(changed)
            self.changed.extend(changed)
            builds.replace_one(key, record, upsert=True)
            self.rebuilt.append((record["run_type"], record["hull_chemsys"]))


VALUE_TOL = 1e-9  # eV/atom: hull values closer than this count as unchanged (qhull round-off)


def same_values(a: Any, b: Any) -> bool:
    """Equal thermo values, ignoring ``built_at`` and float round-off below VALUE_TOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - {"built_at"}
        return all(same_values(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= VALUE_TOL
    return a == b


def run_builder(builder: Builder) -> int:
    """Run get_items/process_item/update_targets without closing the stores.

    ``Builder.run()`` closes its stores at the end, which would close a MongoClient that
    a LaunchPad shares; amdflow runs builders on the LaunchPad's own connection.
    Returns the number of items processed.
    """
    builder.ensure_indexes()
    results = [builder.process_item(item) for item in builder.get_items()]
    builder.update_targets(results)
    return len(results)
