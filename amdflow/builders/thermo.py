"""ThermoBuilder: relaxed tasks -> hull documents, grouped by chemical system.

For every chemical system to build (the largest systems among the tasks, or the ones
asked for), all tasks of that run type whose chemsys is a subsystem go into one
PhaseDiagram (elemental reference relaxations included); each material gets a thermo
doc keyed by (material_id, hull_chemsys). Run types are never mixed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from maggma.core import Builder, Store

from amdflow.errors import AmdflowError
from amdflow.schemas import ThermoDoc, utcnow
from amdflow.thermo.hull import HullEntry, hull_analysis, subsystems

logger = logging.getLogger(__name__)

TASK_FIELDS = ["task_id", "formula", "chemsys", "energy_per_atom", "kind", "candidate_id", "campaign", "run_type"]


class ThermoBuilder(Builder):
    """Builds ``thermo`` from ``tasks`` for one run type."""

    def __init__(self, tasks: Store, thermo: Store, run_type: str, chemsys: list[str] | None = None, **kwargs: Any) -> None:
        self.tasks = tasks
        self.thermo = thermo
        self.run_type = run_type
        self.chemsys = chemsys
        super().__init__(sources=[tasks], targets=[thermo], **kwargs)

    def ensure_indexes(self) -> None:
        self.tasks.ensure_index("run_type")
        self.tasks.ensure_index("chemsys")
        self.thermo.ensure_index("material_id")
        self.thermo.ensure_index("hull_chemsys")

    def systems_to_build(self) -> list[str]:
        present = set(self.tasks.distinct("chemsys", {"run_type": self.run_type}))
        wanted = set(self.chemsys) if self.chemsys else present
        sets = {s: frozenset(s.split("-")) for s in wanted}
        return sorted(s for s, els in sets.items() if len(els) > 1 and not any(els < o for o in sets.values()))

    def get_items(self) -> Iterator[dict[str, Any]]:
        for system in self.systems_to_build():
            docs = list(self.tasks.query({"run_type": self.run_type, "chemsys": {"$in": subsystems(system)}}, properties=TASK_FIELDS))
            yield {"chemsys": system, "tasks": docs}

    def process_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        system = item["chemsys"]
        by_id = {d["task_id"]: d for d in item["tasks"]}
        entries = [HullEntry(d["task_id"], d["formula"], d["energy_per_atom"]) for d in item["tasks"]]
        try:
            results = hull_analysis(entries, system.split("-"))
        except AmdflowError as err:
            logger.warning("hull %s skipped: %s", system, err)
            return []
        now = utcnow()
        docs = []
        for r in results:
            task = by_id[r.entry_id]
            docs.append(
                ThermoDoc(
                    material_id=r.entry_id,
                    candidate_id=task.get("candidate_id"),
                    campaign=task.get("campaign"),
                    formula=r.formula,
                    chemsys=task["chemsys"],
                    hull_chemsys=system,
                    run_type=self.run_type,
                    energy_per_atom=r.energy_per_atom,
                    formation_energy_per_atom=r.formation_energy_per_atom,
                    e_above_hull=r.e_above_hull,
                    is_stable=r.is_stable,
                    decomposes_to=r.decomposes_to,
                    built_at=now,
                ).to_mongo()
            )
        return docs

    def update_targets(self, items: list[list[dict[str, Any]]]) -> None:
        docs = [d for group in items for d in group]
        if not docs:
            return
        coll = getattr(self.thermo, "_coll", None)
        if coll is not None and type(coll).__module__.startswith("mongomock"):
            # mongomock's bulk_write rejects pymongo >= 4.11 ReplaceOne (its new `sort`
            # argument), which MongoStore.update uses: upsert one by one on mongomock.
            for d in docs:
                coll.replace_one({"material_id": d["material_id"], "hull_chemsys": d["hull_chemsys"]}, d, upsert=True)
        else:
            self.thermo.update(docs, key=["material_id", "hull_chemsys"])


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
