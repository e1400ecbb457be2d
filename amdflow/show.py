"""``amdflow show``: everything known about one candidate, gathered (:func:`candidate_report`) and drawn on one screen."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import RenderableType

    from amdflow.api import Campaign


def candidate_report(camp: Campaign, candidate_id: str) -> dict[str, Any]:
    """The candidate's story as one JSON-ready dict: generation, screen, dedup, funnel, tasks, hulls, history, files."""
    doc = camp.candidate(candidate_id)
    cid = doc["candidate_id"]
    tpl = doc.get("template") or {}
    tasks = []
    for t in camp.candidate_tasks(cid):
        details = t.get("details") or {}
        tasks.append({
            "task_id": t["task_id"], "level": t.get("level", "final"), "engine": t.get("engine"), "run_type": t.get("run_type"),
            "energy_per_atom": t.get("energy_per_atom"), "converged": t.get("converged"), "n_steps": t.get("n_steps"),
            "max_force": t.get("max_force"), "run_time_s": t.get("run_time_s"),
            "corrections": [{"errors": c.get("errors"), "actions": c.get("actions")} for c in details.get("corrections") or []],
            "dir_name": t.get("dir_name"),
        })
    thermo = [{k: d.get(k) for k in ("run_type", "hull_chemsys", "formation_energy_per_atom", "e_above_hull",
                                     "e_above_known_hull", "is_stable", "in_hull")} for d in camp.candidate_thermo(cid)]
    history = camp.history(cid)
    references = _references(camp, doc)
    files = []
    promising = camp.output_dir / "promising"
    if promising.is_dir():
        files += sorted(str(p) for p in promising.glob(f"*{cid}*"))
    files += [t["dir_name"] for t in tasks if t.get("dir_name") and Path(t["dir_name"]).exists()]
    search = None
    if tpl.get("source") == "random" and doc.get("formula"):
        from amdflow.stages.random_search import campaign_search

        stat = campaign_search(camp.db, camp.config, [doc["formula"]]).get(doc["formula"])
        search = None if stat is None else {**stat.as_dict(), "is_lowest": stat.lowest_id == cid}
    return {
        "candidate_id": cid, "campaign": doc.get("campaign"), "random": doc.get("random"), "random_search": search, "state": str(doc.get("state")), "formula": doc.get("formula"),
        "nsites": doc.get("nsites"), "template": f"{tpl.get('source')}:{tpl.get('template_id')}" if tpl else None,
        "template_formula": tpl.get("formula"), "substitution": doc.get("substitution"), "lattice_scale": doc.get("lattice_scale"),
        "min_bond_ratio": doc.get("min_bond_ratio"),
        "prediction": doc.get("prediction"), "dedup": doc.get("dedup"), "dedup_bucket": doc.get("dedup_bucket"),
        "funnel": doc.get("funnel"), "task_id": doc.get("task_id"), "thermo_summary": doc.get("thermo"), "error": doc.get("error"),
        "tasks": tasks, "thermo": thermo, "references": references,
        "history": [{k: _plain(v) for k, v in r.items()} for r in history.to_dict("records")],
        "files": files, "created_at": doc.get("created_at"), "updated_at": doc.get("updated_at"),
    }


def _references(camp: Campaign, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per relaxation level ('final', 'funnel'): each of the candidate's elements' reference (structure and energy)."""
    from pymatgen.core import Composition

    from amdflow.stages import chosen_references

    elements = sorted(el.symbol for el in Composition(doc["formula"]).elements) if doc.get("formula") else []
    levels = {"final": camp.run_type, "funnel": camp.funnel_run_type}
    return {level: {"run_type": rt, "elements": chosen_references(camp.db, rt, elements)} for level, rt in levels.items() if rt}


def _plain(value: Any) -> Any:
    """A table cell as JSON: pandas' missing values (NaN, NaT) None, times ISO text, numpy numbers Python ones."""
    import pandas as pd

    if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value.item() if hasattr(value, "item") else value


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def render(rep: dict[str, Any]) -> list[RenderableType]:
    """Rich renderables of :func:`candidate_report`'s dict, top to bottom."""
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    sub = " ".join(f"{a}->{b}" for a, b in sorted((rep.get("substitution") or {}).items()))
    head.add_row("candidate", f"{rep['candidate_id']}  ({rep['campaign']})")
    head.add_row("state", rep["state"] + (f"  error: {rep['error']}" if rep.get("error") else ""))
    head.add_row("formula", f"{rep['formula']}, {rep['nsites']} sites")
    head.add_row("template", f"{rep['template']} ({rep.get('template_formula')}), {sub}, lattice x{rep.get('lattice_scale')}"
                 + (f", shortest bond {rep['min_bond_ratio']:.2f} x the covalent radii" if rep.get("min_bond_ratio") else ""))
    rnd, search = rep.get("random"), rep.get("random_search")
    if rnd:
        found = "" if not search else (
            f"; {search['composition']}: {search['relaxed']}/{search['generated']} starts relaxed"
            f"{', ' + str(search['holes']) + ' in holes of the potential' if search.get('holes') else ''}, the lowest "
            f"({_f(search['lowest_energy_per_atom'], 4)} eV/atom{', this one' if search['is_lowest'] else ''}) found "
            f"{search['found_lowest']}x, {'searched enough' if search['converged'] else 'not yet searched enough'}")
        head.add_row("random search", f"start {rnd.get('index')} (seed {rnd.get('seed')}), space group {rnd.get('space_group')}, "
                                      f"Z = {rnd.get('z')}{found}")
    pred = rep.get("prediction")
    if pred:
        verdict = ("passed unscreened (a random cell: screen.random_pass)" if pred.get("unscreened") else "passed"
                   if pred.get("passed") else f"screened out: {pred.get('reason') or 'above the threshold'}")
        head.add_row("CGCNN", f"E_f {_f(pred.get('formation_energy_per_atom'))} eV/atom ({pred.get('mode')} screen, "
                              f"threshold {pred.get('threshold')}): {verdict}")
    else:
        head.add_row("CGCNN", "not predicted yet")
    dedup = rep.get("dedup")
    if dedup:
        head.add_row("dedup", (f"duplicate of {dedup['duplicate_of']}" if dedup.get("duplicate_of") else "kept (its family's lowest)")
                     + f"; compared with {dedup.get('compared')} representative(s) of bucket {rep.get('dedup_bucket')}")
    elif pred and pred.get("passed"):
        head.add_row("dedup", "not decided yet")
    funnel = rep.get("funnel")
    if funnel:
        where = f"E_hull {_f(funnel.get('e_above_hull'))} eV/atom on the {funnel.get('run_type')} hull (cut {funnel.get('max_e_above_hull')})"
        verdict = "passed" if funnel.get("passed") else f"cut: {funnel.get('reason')}"
        head.add_row("funnel", f"{funnel.get('model')}: {where}, {funnel.get('n_steps')} steps, "
                               f"{'converged' if funnel.get('converged') else 'not converged'}: {verdict}")
    for level, refs in (rep.get("references") or {}).items():
        shown = "; ".join(f"{el}: {r['name']}, {_f(r['energy_per_atom'], 4)} eV/atom" for el, r in refs["elements"].items())
        head.add_row(f"references ({level})", shown or "not relaxed yet")
    out: list[Any] = [head]
    if rep["tasks"]:
        t = Table(title="relaxations", title_justify="left")
        for col in ("level", "run type", "E (eV/atom)", "converged", "steps", "max F (eV/Å)", "corrections"):
            t.add_column(col)
        for task in rep["tasks"]:
            corr = "; ".join(",".join(c.get("errors") or []) for c in task["corrections"]) or "none"
            t.add_row(task["level"], task["run_type"], _f(task["energy_per_atom"], 4),
                      "yes" if task["converged"] else "NO", _f(task["n_steps"]), _f(task["max_force"]), corr)
        out.append(t)
    if rep["thermo"]:
        t = Table(title="hulls", title_justify="left")
        for col in ("run type", "system", "E_f (eV/atom)", "E_hull", "vs known", "stable"):
            t.add_column(col)
        for d in rep["thermo"]:
            t.add_row(d["run_type"], d["hull_chemsys"], _f(d["formation_energy_per_atom"]), _f(d["e_above_hull"]),
                      _f(d.get("e_above_known_hull")), "yes" if d["is_stable"] else "")
        out.append(t)
    if rep["history"]:
        t = Table(title="history", title_justify="left")
        for col in ("stage", "Firework", "state", "launch", "host", "started", "s"):
            t.add_column(col)
        for h in rep["history"]:
            t.add_row(h["stage"], str(h["fw_id"]), h["fw_state"], _f(h.get("launch_id")), h.get("host") or "-",
                      (h.get("started") or "-")[:19], _f(h.get("seconds"), 1))
        out.append(t)
    if rep["files"]:
        out.append("files: " + ", ".join(rep["files"]))
    return out
