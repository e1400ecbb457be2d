"""Analyze: the campaign's hull (incremental ThermoBuilder), candidates' hull summaries, promising/ and plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from pymongo import UpdateOne

from amdflow.campaign import CampaignConfig
from amdflow.db import AmdflowDB, bulk_write
from amdflow.schemas import CandidateState, utcnow
from amdflow.stages.common import HULL_CLAIM_STALE_S, claim, failpoint_delay, load_campaign_config

logger = logging.getLogger(__name__)

PROMISING_DIR = "promising"
PLOT_FILE = "phase_diagram.png"
PLOT_HTML = "phase_diagram.html"


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
        failpoint_delay("AMDFLOW_FAILPOINT_HULL_DELAY_S")  # tests: a rocket surely killed while it holds the hull claim
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
                   "promising": sum(1 for t in db.thermo.find({**q, "campaign": cfg.name,  # candidates only, on an index
                                                                   "e_above_hull": {"$lte": cfg.analyze.promising_e_above_hull}},
                                                              {"_id": 0, "candidate_id": 1}) if t.get("candidate_id")),
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
    cands = {c["candidate_id"]: c for c in db.candidates.find({"candidate_id": {"$in": [c["candidate_id"] for c in chosen]}}, {"_id": 0, "candidate_id": 1, "template": 1, "prediction": 1, "min_bond_ratio": 1})}
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
            material_id=t["material_id"], min_bond_ratio=cand.get("min_bond_ratio"),
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
