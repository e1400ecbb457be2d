"""A campaign's results as pandas tables and pymatgen objects: read-only, on the embedded store or MongoDB.

>>> import amdflow
>>> camp = amdflow.open_campaign("demo/campaign.yaml")            # doctest: +SKIP
>>> camp.thermo(stable=True)[["formula", "e_above_hull_eV_per_atom"]]  # doctest: +SKIP
  formula  e_above_hull_eV_per_atom
0  CeFe2In                       0.0
>>> pd = camp.phase_diagram()                                     # pymatgen PhaseDiagram  # doctest: +SKIP
>>> camp.structure("3f9c2e")                                      # a unique id prefix is enough  # doctest: +SKIP

The campaign is opened the way the CLI opens it (:func:`amdflow.db.open_db`, ``read_only``):
nothing is written, not even an index, so a MongoDB user with the ``read`` role suffices. On
the embedded store the object holds an in-memory copy as of opening and releases the
store's lock at once (``amdflow run`` can go on; open again to see its progress); while
another amdflow process holds the store, opening fails with the usual one-line message.

Energies are eV/atom, as the column names say. Every query is answered from an index and
reads only the fields it returns (the candidates' structures only in :meth:`structure`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amdflow.errors import AmdflowError

if TYPE_CHECKING:
    import pandas as pd
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Structure
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    from amdflow.campaign import CampaignConfig
    from amdflow.db import AmdflowDB

EV = "_eV_per_atom"
#: thermo document field -> DataFrame column (units in the name)
THERMO_COLUMNS = {
    "candidate_id": "candidate_id", "material_id": "material_id", "formula": "formula", "kind": "kind",
    "campaign": "campaign", "hull_chemsys": "hull_chemsys", "run_type": "run_type",
    "energy_per_atom": "energy" + EV, "formation_energy_per_atom": "formation_energy" + EV,
    "e_above_hull": "e_above_hull" + EV, "e_above_known_hull": "e_above_known_hull" + EV,
    "is_stable": "is_stable", "in_hull": "in_hull", "decomposes_to": "decomposes_to", "source": "source",
}
CANDIDATE_COLUMNS = [
    "candidate_id", "formula", "nsites", "template", "substitution", "lattice_scale", "state",
    "predicted_formation_energy" + EV, "screen_passed", "screen_reason", "duplicate_of", "dedup_compared",
    "funnel_e_above_hull" + EV, "funnel_passed", "task_id", "formation_energy" + EV, "e_above_hull" + EV, "is_stable",
    "error", "updated_at",
]
TASK_COLUMNS = [
    "task_id", "kind", "level", "candidate_id", "formula", "chemsys", "nsites", "run_type", "engine", "energy_eV",
    "energy" + EV, "converged", "n_steps", "max_force_eV_per_A", "run_time_s", "n_corrections", "dir_name", "created_at",
]
_TASK_FIELDS = ["task_id", "kind", "level", "candidate_id", "campaign", "formula", "chemsys", "nsites", "run_type", "engine",
                "engine_note", "energy", "energy_per_atom", "converged", "n_steps", "max_force", "run_time_s",
                "details.corrections", "dir_name", "created_at"]


def open_campaign(campaign: str | Path, launchpad: str | Path | None = None) -> Campaign:
    """Open a campaign's results, read-only.

    ``campaign``: the campaign YAML file (its ``output_dir`` holds the embedded store), or,
    with a MongoDB ``launchpad`` file (default: ``AMDFLOW_LAUNCHPAD_FILE``), a campaign name.
    Use it as a context manager, or call :meth:`Campaign.close` when done.
    """
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db
    from amdflow.settings import get_settings

    settings = get_settings(**({"launchpad_file": Path(launchpad)} if launchpad else {}))
    path = Path(campaign)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        cfg = load_campaign(path)
        name, folder = cfg.name, cfg.output_dir
    elif settings.launchpad_file is not None:
        name, folder = str(campaign), None
    else:
        raise AmdflowError(f"{campaign}: no such campaign file; give the campaign YAML file, or a campaign name together "
                           "with a MongoDB LaunchPad file (launchpad=... or AMDFLOW_LAUNCHPAD_FILE)")
    stack = contextlib.ExitStack()
    try:
        db = stack.enter_context(open_db(folder, settings, read_only=True))
        return Campaign(db, name, stack, source=str(campaign))
    except BaseException:
        stack.close()
        raise


class Campaign:
    """One campaign's results (read-only). Made by :func:`open_campaign`."""

    def __init__(self, db: AmdflowDB, name: str, stack: contextlib.ExitStack | None = None, source: str | None = None) -> None:
        from amdflow.stages.common import load_campaign_config

        self.db = db
        self.source = source or name  # what the user opened (the campaign file), for messages
        self._stack = stack
        self.config: CampaignConfig
        self.config, doc = load_campaign_config(db, name)
        self.name: str = name
        self.chemsys: str = doc["chemsys"]
        self.run_type: str = doc["run_type"]
        self.funnel_run_type: str | None = doc.get("funnel_run_type")
        self.output_dir = Path(doc.get("output_dir") or ".")

    # ------------------------------------------------------------------ life
    def close(self) -> None:
        """Release the database (the embedded store's in-memory copy, or the MongoDB client)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> Campaign:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<amdflow campaign {self.name} ({self.chemsys}, {self.run_type})>"

    # ------------------------------------------------------------------ hull
    def _run_type(self, run_type: str | None) -> str:
        if run_type in (None, "final"):
            return self.run_type
        if run_type == "funnel":
            if not self.funnel_run_type:
                raise AmdflowError(f"campaign {self.name} has no funnel: its only hull is {self.run_type}")
            return self.funnel_run_type
        return str(run_type)

    def _thermo_docs(self, stable: bool | None = None, max_e_above_hull: float | None = None, run_type: str | None = None,
                     chemsys: str | None = None, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"run_type": self._run_type(run_type), "hull_chemsys": _chemsys(chemsys or self.chemsys)}
        if stable is not None:
            query["is_stable"] = bool(stable)
        if max_e_above_hull is not None:
            query["e_above_hull"] = {"$lte": float(max_e_above_hull)}
        docs = list(self.db.thermo.find(query, {"_id": 0, **dict.fromkeys(THERMO_COLUMNS, 1)}))
        if kinds:
            docs = [d for d in docs if d.get("kind", "candidate") in kinds]
        docs.sort(key=lambda d: (d["e_above_hull"], d["formula"], d["material_id"]))
        return docs

    def thermo(self, stable: bool | None = None, max_e_above_hull: float | None = None, run_type: str | None = None,
               chemsys: str | None = None, kinds: tuple[str, ...] | None = None) -> pd.DataFrame:
        """Every phase on the campaign's hull (candidates, elemental references, known phases), lowest E_hull first.

        ``run_type``: the campaign's final one (default, also ``"final"``), ``"funnel"`` for the
        ML hull, or a run-type key. ``chemsys``: a subsystem's own hull (e.g. ``"Fe-In"``).
        ``kinds``: e.g. ``("candidate",)``. Candidates of other campaigns of the same system and
        run type share the hull: the ``campaign`` column says whose they are.

        >>> camp.thermo(stable=True, kinds=("candidate",))            # doctest: +SKIP
        """
        import pandas as pd

        docs = self._thermo_docs(stable, max_e_above_hull, run_type, chemsys, kinds)
        rows = [{col: _cell(d.get(field)) for field, col in THERMO_COLUMNS.items()} for d in docs]
        return pd.DataFrame(rows, columns=list(THERMO_COLUMNS.values()))

    def entries(self, run_type: str | None = None, chemsys: str | None = None, stable: bool | None = None,
                max_e_above_hull: float | None = None, include_unconverged: bool = True) -> list[ComputedStructureEntry]:
        """The relaxed phases of the hull as pymatgen ``ComputedStructureEntry`` objects (total energies, eV).

        ``entry_id`` is the task id; ``data`` holds the candidate id, kind, run type and the hull
        position (``e_above_hull``, ``formation_energy_per_atom``) where one was built. Imported
        known phases whose energies were used as they are come with their own structure.
        ``stable`` / ``max_e_above_hull`` select on the built hull; ``include_unconverged=False``
        leaves out relaxations that did not converge (the builder keeps them off the hull's shape).
        """
        from pymatgen.core import Structure
        from pymatgen.entries.computed_entries import ComputedStructureEntry

        from amdflow.thermo.hull import subsystems

        rt = self._run_type(run_type)
        system = _chemsys(chemsys or self.chemsys)
        placed = {d["material_id"]: d for d in self._thermo_docs(None, None, rt, system)}
        keep = None
        if stable is not None or max_e_above_hull is not None:
            keep = {d["material_id"] for d in self._thermo_docs(stable, max_e_above_hull, rt, system)}
        query = {"run_type": rt, "chemsys": {"$in": subsystems(system)}}
        out = []
        fields = {"_id": 0, "task_id": 1, "kind": 1, "candidate_id": 1, "campaign": 1, "run_type": 1, "energy": 1,
                  "final_structure": 1, "converged": 1, "source": 1}
        for d in self.db.tasks.find(query, fields):
            if (keep is not None and d["task_id"] not in keep) or (not include_unconverged and d.get("converged") is False):
                continue
            out.append(ComputedStructureEntry(Structure.from_dict(d["final_structure"]), float(d["energy"]), entry_id=d["task_id"],
                                              data=_entry_data(d, placed.get(d["task_id"]))))
        for d in self.db.known.find(query, {"_id": 0}):
            if (keep is not None and d["known_id"] not in keep) or not d.get("structure"):
                continue
            s = Structure.from_dict(d["structure"])
            out.append(ComputedStructureEntry(s, float(d["energy_per_atom"]) * len(s), entry_id=d["known_id"],
                                              data=_entry_data({"kind": "known", "source": d.get("source"), "run_type": rt},
                                                               placed.get(d["known_id"]))))
        out.sort(key=lambda e: e.entry_id)
        return out

    def phase_diagram(self, chemsys: str | None = None, run_type: str | None = None) -> PhaseDiagram:
        """pymatgen's ``PhaseDiagram`` of the hull as amdflow built it (converged relaxations shape it).

        Imported known phases without a structure enter as plain ``ComputedEntry`` objects.
        """
        from pymatgen.analysis.phase_diagram import PhaseDiagram

        from amdflow.thermo.hull import subsystems

        rt = self._run_type(run_type)
        system = _chemsys(chemsys or self.chemsys)
        entries: list[Any] = [e for e in self.entries(rt, system) if e.data.get("converged", True) is not False]
        have = {e.entry_id for e in entries}
        for d in self.db.known.find({"run_type": rt, "chemsys": {"$in": subsystems(system)}},
                                    {"_id": 0, "known_id": 1, "formula": 1, "energy_per_atom": 1}):
            if d["known_id"] not in have:
                from amdflow.thermo.hull import EntryKind, HullEntry

                entries.append(HullEntry(d["known_id"], d["formula"], float(d["energy_per_atom"]), kind=EntryKind.KNOWN).to_computed_entry())
        if not entries:
            raise AmdflowError(f"no relaxed phase of {system} ({rt}) yet: run the campaign (`amdflow run`) first")
        try:
            return PhaseDiagram(entries, elements=None)
        except ValueError as err:
            raise AmdflowError(f"no phase diagram of {system} ({rt}) yet: {err} (are its elemental references relaxed?)") from None

    def hull_figure(self, chemsys: str | None = None, run_type: str | None = None, max_e_above_hull: float = 0.3) -> Any:
        """amdflow's own phase-diagram plot (the report's), as a matplotlib Figure: candidates, references, known phases."""
        from amdflow.report.plot import PlotPoint, phase_diagram_figure

        system = _chemsys(chemsys or self.chemsys)
        points = [PlotPoint.from_thermo(d) for d in self._thermo_docs(None, None, run_type, system)]
        if not points:
            raise AmdflowError(f"no hull of {system} built yet: run the campaign (`amdflow run`) first")
        return phase_diagram_figure(points, system.split("-"), title=f"{self.name}: {system} ({self._run_type(run_type)})",
                                    max_e_above_hull=max_e_above_hull)

    # ------------------------------------------------------------------ candidates
    def candidates(self, state: str | list[str] | None = None, formula: str | None = None) -> pd.DataFrame:
        """One row per candidate: template, prediction, screen, dedup, funnel and hull results.

        ``state``: one state or a list (``amdflow status`` names them: analyzed, duplicate,
        screened_out, over_budget, ...). ``formula``: a reduced formula.
        """
        import pandas as pd

        from amdflow.schemas import CandidateState

        query: dict[str, Any] = {"campaign": self.name}
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            known = {s.value for s in CandidateState}
            bad = [s for s in states if s not in known]
            if bad:
                raise AmdflowError(f"unknown candidate state {bad[0]!r}: choose from {', '.join(sorted(known))}")
            query["state"] = states[0] if len(states) == 1 else {"$in": states}
        fields = {"_id": 0, "structure": 0, "resume": 0, "funnel.checked_at_relax": 0}
        rows = []
        for d in self.db.candidates.find(query, fields):
            if formula is not None and d.get("formula") != formula:
                continue
            rows.append(candidate_row(d))
        rows.sort(key=lambda r: r["candidate_id"])
        return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)

    def tasks(self, run_type: str | None = None, kind: str | None = None) -> pd.DataFrame:
        """One row per relaxation of this campaign's system (candidates, references, known phases), every run type
        unless ``run_type`` is given (``"final"``, ``"funnel"`` or a key)."""
        import pandas as pd

        from amdflow.thermo.hull import subsystems

        run_types = [self._run_type(run_type)] if run_type else [rt for rt in (self.run_type, self.funnel_run_type) if rt]
        query: dict[str, Any] = {"run_type": {"$in": run_types}, "chemsys": {"$in": subsystems(self.chemsys)}}
        rows = []
        for d in self.db.tasks.find(query, {"_id": 0, **dict.fromkeys(_TASK_FIELDS, 1)}):
            if kind is not None and d.get("kind") != kind:
                continue
            if d.get("kind") == "candidate" and d.get("campaign") not in (None, self.name):
                continue
            rows.append(task_row(d))
        rows.sort(key=lambda r: r["task_id"])
        return pd.DataFrame(rows, columns=TASK_COLUMNS)

    def resolve(self, candidate_id: str) -> str:
        """The full id of the candidate ``candidate_id`` names (a unique prefix is enough)."""
        cid = str(candidate_id).strip()
        if not cid:
            raise AmdflowError(f"give a candidate id (or a unique prefix of one): `amdflow export {self.source} --what candidates` lists them")
        if self.db.candidates.find_one({"candidate_id": cid, "campaign": self.name}, {"_id": 1}) is not None:
            return cid
        found = [d["candidate_id"] for d in self.db.candidates.find(
            {"candidate_id": prefix_range(cid), "campaign": self.name}, {"_id": 0, "candidate_id": 1}).limit(6)]
        if not found:
            raise AmdflowError(f"no candidate {cid!r} in campaign {self.name}: `amdflow export {self.source} --what candidates` lists them")
        if len(found) > 1:
            shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
            raise AmdflowError(f"candidate prefix {cid!r} is ambiguous in campaign {self.name} ({shown}): give more characters")
        return found[0]

    def candidate(self, candidate_id: str) -> dict[str, Any]:
        """The candidate's document as stored (a unique id prefix is enough)."""
        cid = self.resolve(candidate_id)
        return self.db.candidates.find_one({"candidate_id": cid}, {"_id": 0})

    def structure(self, candidate_id: str, relaxed: bool = True) -> Structure:
        """The candidate's structure: relaxed by the final relax if it ran (``relaxed``), else the generated one."""
        from pymatgen.core import Structure

        doc = self.candidate(candidate_id)
        if relaxed and doc.get("task_id"):
            task = self.db.tasks.find_one({"task_id": doc["task_id"]}, {"_id": 0, "final_structure": 1})
            if task and task.get("final_structure"):
                return Structure.from_dict(task["final_structure"])
        return Structure.from_dict(doc["structure"])

    def history(self, candidate_id: str) -> pd.DataFrame:
        """What happened to the candidate, in time order: each stage's Firework and every launch of it.

        Columns: stage, fw_id, fw_state, launch_id, launch_state, host, started, ended, seconds.
        """
        import pandas as pd

        doc = self.candidate(candidate_id)
        fw_ids = {int(v): k for k, v in (doc.get("fw_ids") or {}).items()}
        lp = self.db.launchpad
        rows = []
        fws = list(lp.fireworks.find({"fw_id": {"$in": list(fw_ids)}}, {"_id": 0, "fw_id": 1, "state": 1, "launches": 1,
                                                                        "archived_launches": 1, "created_on": 1}))
        launch_ids = [lid for f in fws for lid in (f.get("launches") or []) + (f.get("archived_launches") or [])]
        launches = {d["launch_id"]: d for d in lp.launches.find({"launch_id": {"$in": launch_ids}},
                                                                {"_id": 0, "launch_id": 1, "state": 1, "host": 1, "time_start": 1,
                                                                 "time_end": 1, "state_history": 1})}
        for f in fws:
            ids = (f.get("archived_launches") or []) + (f.get("launches") or [])
            if not ids:
                rows.append({"stage": fw_ids[f["fw_id"]], "fw_id": f["fw_id"], "fw_state": f["state"], "launch_id": None,
                             "launch_state": None, "host": None, "started": None, "ended": None, "seconds": None})
            for lid in ids:
                ln = launches.get(lid, {})
                start, end = _launch_times(ln)
                rows.append({"stage": fw_ids[f["fw_id"]], "fw_id": f["fw_id"], "fw_state": f["state"], "launch_id": lid,
                             "launch_state": ln.get("state"), "host": ln.get("host"), "started": start, "ended": end,
                             "seconds": (end - start).total_seconds() if start and end else None})
        order = {s: k for k, s in enumerate(("predict", "dedup", "funnel", "relax", "analyze"))}
        rows.sort(key=lambda r: (r["started"] is None, r["started"] or 0, order.get(r["stage"], 9), r["fw_id"]))
        return pd.DataFrame(rows, columns=["stage", "fw_id", "fw_state", "launch_id", "launch_state", "host", "started", "ended",
                                           "seconds"])

    def candidate_tasks(self, candidate_id: str) -> list[dict[str, Any]]:
        """Every task document of the candidate (funnel and final relaxations), without structures."""
        cid = self.resolve(candidate_id)
        docs = list(self.db.tasks.find({"candidate_id": cid}, {"_id": 0, "input_structure": 0, "final_structure": 0}))
        return sorted(docs, key=lambda d: (d.get("level") != "funnel", d["task_id"]))

    def candidate_thermo(self, candidate_id: str) -> list[dict[str, Any]]:
        """The candidate's place on every hull built with it (final and ML run types, each hull system)."""
        cid = self.resolve(candidate_id)
        docs = list(self.db.thermo.find({"candidate_id": cid}, {"_id": 0, "decomposes_to": 0}))
        return sorted(docs, key=lambda d: (d["run_type"] != self.run_type, d["run_type"], d["hull_chemsys"]))


# ---------------------------------------------------------------------- rows (pure)
def prefix_range(prefix: str) -> dict[str, Any]:
    """A filter matching exactly the strings that start with ``prefix``, as an index range.

    ``{"$gte": prefix, "$lt": prefix with its last character's successor}``: MongoDB (simple collation) orders strings
    by their UTF-8 bytes, which is code-point order, so the range holds exactly the strings with that prefix. A
    ``$regex`` "^prefix" means the same, but only MongoDB's planner turns it into a range: the wire test server
    scanned all 100k candidates for it (26 s per `amdflow show`).
    """
    last = ord(prefix[-1])
    if last >= 0x10FFFF:  # no successor: the regex (never in amdflow's ids)
        return {"$regex": f"^{re.escape(prefix)}"}
    return {"$gte": prefix, "$lt": prefix[:-1] + chr(last + 1)}


def candidate_row(d: dict[str, Any]) -> dict[str, Any]:
    """A candidate document as one table row (energies eV/atom)."""
    pred = d.get("prediction") or {}
    dedup = d.get("dedup") or {}
    funnel = d.get("funnel") or {}
    thermo = d.get("thermo") or {}
    tpl = d.get("template") or {}
    return {
        "candidate_id": d["candidate_id"], "formula": d.get("formula"), "nsites": d.get("nsites"),
        "template": f"{tpl.get('source')}:{tpl.get('template_id')}" if tpl else None,
        "substitution": " ".join(f"{a}->{b}" for a, b in sorted((d.get("substitution") or {}).items())),
        "lattice_scale": d.get("lattice_scale"), "state": _cell(d.get("state")),
        "predicted_formation_energy" + EV: pred.get("formation_energy_per_atom"),
        "screen_passed": pred.get("passed"), "screen_reason": pred.get("reason"),
        "duplicate_of": dedup.get("duplicate_of"), "dedup_compared": dedup.get("compared"),
        "funnel_e_above_hull" + EV: funnel.get("e_above_hull"), "funnel_passed": funnel.get("passed"),
        "task_id": d.get("task_id"), "formation_energy" + EV: thermo.get("formation_energy_per_atom"),
        "e_above_hull" + EV: thermo.get("e_above_hull"), "is_stable": thermo.get("is_stable"),
        "error": d.get("error"), "updated_at": d.get("updated_at"),
    }


def task_row(d: dict[str, Any]) -> dict[str, Any]:
    """A task document as one table row."""
    return {
        "task_id": d["task_id"], "kind": d.get("kind"), "level": d.get("level", "final"), "candidate_id": d.get("candidate_id"),
        "formula": d.get("formula"), "chemsys": d.get("chemsys"), "nsites": d.get("nsites"), "run_type": d.get("run_type"),
        "engine": d.get("engine"), "energy_eV": d.get("energy"), "energy" + EV: d.get("energy_per_atom"),
        "converged": d.get("converged"), "n_steps": d.get("n_steps"), "max_force_eV_per_A": d.get("max_force"),
        "run_time_s": d.get("run_time_s"), "n_corrections": len((d.get("details") or {}).get("corrections") or []),
        "dir_name": d.get("dir_name"), "created_at": d.get("created_at"),
    }


def _entry_data(task: dict[str, Any], placed: dict[str, Any] | None) -> dict[str, Any]:
    data = {k: task.get(k) for k in ("candidate_id", "campaign", "kind", "run_type", "converged", "source") if task.get(k) is not None}
    if placed:
        data.update({k: placed[k] for k in ("formation_energy_per_atom", "e_above_hull", "e_above_known_hull", "is_stable",
                                            "hull_chemsys") if placed.get(k) is not None})
    return data


def _cell(value: Any) -> Any:
    """Enum values as their strings; lists and dicts as they are."""
    return getattr(value, "value", value)


def _chemsys(text: str) -> str:
    """'In-Fe-Ce' or 'CeFeIn' elements, sorted as amdflow stores hull systems ('Ce-Fe-In')."""
    from pymatgen.core import Element

    parts = [p for p in re.split(r"[-\s,]+", text.strip()) if p] if "-" in text or " " in text or "," in text else \
        re.findall(r"[A-Z][a-z]?", text)
    try:
        return "-".join(sorted({Element(p).symbol for p in parts}))
    except ValueError:
        raise AmdflowError(f"{text!r} is not a chemical system: write it as elements joined by '-', e.g. Ce-Fe-In") from None


def _launch_times(launch: dict[str, Any]) -> tuple[Any, Any]:
    from amdflow.ops import _as_datetime

    start = _as_datetime(launch.get("time_start"))
    end = _as_datetime(launch.get("time_end"))
    hist = launch.get("state_history") or []
    if start is None:
        for h in hist:
            if h.get("state") == "RUNNING":
                start = _as_datetime(h.get("created_on"))
                break
    if end is None and launch.get("state") in ("COMPLETED", "FIZZLED"):
        end = _as_datetime(hist[-1].get("created_on")) if hist else None
    return start, end
