"""Training data: a campaign's own hull as (structures, formation energies) for CGCNN fine-tuning."""

from __future__ import annotations

from typing import Any

from amdflow.db import AmdflowDB
from amdflow.errors import AmdflowError
from amdflow.stages.common import load_campaign_config


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
