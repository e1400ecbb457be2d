"""Results in a scientist's hands: ``amdflow.open_campaign``, ``amdflow show``, ``amdflow export`` and the notebook.

One finished Al-Ni campaign (SevenNet-0 funnel, CHGNet final relax, a budget of 1) made
through the CLI on the embedded store, as a user makes it, and one left part-way with a
relax engine that cannot run here (VASP without POTCARs): between them a candidate of
every state. Every answer is checked against the database documents or against pymatgen
reading the exported files back.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amdflow.schemas import CandidateState

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AMDFLOW_PROGRESS": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "amdflow", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"amdflow {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str) -> tuple[int, str, str]:
    """``amdflow ARGS`` in this process (typer's runner): the commands' own code, without a new interpreter's imports."""
    from typer.testing import CliRunner

    from amdflow.cli import app

    res = CliRunner(env={"AMDFLOW_PROGRESS": "false", "COLUMNS": "160"}).invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def _campaign(folder: Path, name: str, **over) -> Path:
    spec = {
        "name": name, "elements": ["Ni", "Al"],
        "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c", "AB_cF8_225_a_b"]}],
        "generate": {"lattice_scales": [1.0, 1.03]},
        "screen": {"mode": "top_k", "top_k": 3},
        "funnel": {"engine": "sevennet", "max_e_above_hull": 0.05, "max_steps": 40},
        "relax": {"engine": "chgnet", "fmax": 0.1, "max_steps": 40, "reference_prototypes": ["fcc"], "budget": 1},
        "analyze": {"promising_e_above_hull": 0.1},
        "output_dir": str(folder / f"{name}-out"),
    }
    spec.update(over)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stepped(tmp_path_factory) -> tuple[Path, dict[str, tuple[dict, str, dict]]]:
    """A campaign run to its end a few Fireworks at a time (`amdflow run --max-fireworks 4`, then 1), and, for each candidate
    state the first time it is seen, `amdflow show` of such a candidate then (text and --json) with its document."""
    import amdflow

    folder = tmp_path_factory.mktemp("api")
    path = _campaign(folder, "AlNi-api")
    cli("add", str(path), cwd=folder)  # a real process once
    shows: dict[str, tuple[dict, str, dict]] = {}
    step = "4"
    for _ in range(80):
        code, _, err = run_cli("run", path, "--max-fireworks", step)
        assert code == 0 and "Traceback" not in err, err
        with amdflow.open_campaign(path) as camp:
            docs = {d["candidate_id"]: d for d in camp.db.candidates.find({}, {"_id": 0, "structure": 0})}
        for cid, doc in sorted(docs.items()):
            if doc["state"] not in shows:
                text = run_cli("show", path, cid[:10])[1]
                shows[doc["state"]] = (doc, text, json.loads(run_cli("show", path, cid, "--json")[1]))
        if "ran 0 Fireworks" in err:
            return path, shows
        if "unique" in shows:  # funnel and final relaxations next: one Firework at a time, to see each state
            step = "1"
        waiting = [d for d in docs.values() if d["state"] == "prerelaxed"]
        if waiting and "relaxed" not in shows:
            # `amdflow run` builds the hull when it stops, so a relaxed candidate is analyzed before it is seen at
            # rest; on a cluster the relax queue's rocket leaves it relaxed until a CPU rocket runs its analysis
            _rocket(path, waiting[0]["fw_ids"]["relax"])
            shows["relaxed"] = (waiting[0], run_cli("show", path, waiting[0]["candidate_id"][:10])[1],
                                json.loads(run_cli("show", path, waiting[0]["candidate_id"], "--json")[1]))
    raise AssertionError("the campaign did not finish in 80 steps")


def _rocket(path: Path, fw_id: int) -> None:
    """One Firework by FireWorks' own Rocket on the campaign's embedded store (what `rlaunch singleshot` does)."""
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket

    from amdflow.campaign import load_campaign
    from amdflow.db import open_db

    cfg = load_campaign(path)
    with contextlib.chdir(path.parent), open_db(cfg.output_dir) as db:  # the Rocket writes FW.json where it runs
        assert launch_rocket(db.launchpad, FWorker(category="vasp"), fw_id=fw_id, strm_lvl="ERROR")


@pytest.fixture(scope="module")
def finished(stepped) -> Path:
    """The campaign file of a finished campaign (add, then run through the CLI)."""
    return stepped[0]


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory) -> Path:
    """Added, partly run: its relax engine (VASP, no POTCARs here) fails; another candidate never predicted."""
    folder = tmp_path_factory.mktemp("api-b")
    path = _campaign(folder, "AlNi-b", funnel={"engine": "none"},
                     relax={"engine": "vasp", "reference_prototypes": ["fcc"]})
    cli("add", str(path), cwd=folder)
    cli("run", str(path), cwd=folder, env={"AMDFLOW_VASP_CMD": "true", "PMG_VASP_PSP_DIR": str(folder / "no-potcars")})
    cfg = yaml.safe_load(path.read_text())
    cfg["generate"]["lattice_scales"] = [1.0, 1.03, 1.06]  # new candidates: added, not run
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli("add", str(path), "--allow-changed-settings", cwd=folder)
    return path


def _raw(path: Path) -> dict:
    """The store's documents as written on disk (no amdflow code in between)."""
    import bson.json_util

    cfg = yaml.safe_load(path.read_text())
    from amdflow.embedded import DB_NAME, STORE_FILE

    store = bson.json_util.loads((Path(cfg["output_dir"]) / STORE_FILE).read_text())[DB_NAME]
    return {coll: [doc for _, doc in store[coll]["documents"]] for coll in ("candidates", "tasks", "thermo")}


def test_thermo_candidates_and_tasks_are_the_stored_documents(finished):
    import amdflow

    raw = _raw(finished)
    with amdflow.open_campaign(finished) as camp:
        hull = camp.thermo()
        cands = camp.candidates()
        tasks = camp.tasks()
        stable = camp.thermo(stable=True, kinds=("candidate",))
        near = camp.thermo(max_e_above_hull=0.0)
        ml = camp.thermo(run_type="funnel")
    mine = [d for d in raw["thermo"] if d["run_type"] == camp.run_type and d["hull_chemsys"] == "Al-Ni"]
    assert sorted(hull["material_id"]) == sorted(d["material_id"] for d in mine) and len(hull) >= 3
    by_id = {d["material_id"]: d for d in mine}
    for row in hull.to_dict("records"):
        assert row["e_above_hull_eV_per_atom"] == pytest.approx(by_id[row["material_id"]]["e_above_hull"])
        assert row["formation_energy_eV_per_atom"] == pytest.approx(by_id[row["material_id"]]["formation_energy_per_atom"])
    assert list(hull["e_above_hull_eV_per_atom"]) == sorted(hull["e_above_hull_eV_per_atom"])
    assert set(stable["candidate_id"]) == {d["candidate_id"] for d in mine if d["is_stable"] and d["kind"] == "candidate"}
    assert (near["e_above_hull_eV_per_atom"] <= 0.0).all() and len(near) == sum(d["e_above_hull"] <= 0 for d in mine)
    assert set(ml["run_type"]) == {camp.funnel_run_type} and camp.funnel_run_type != camp.run_type
    assert sorted(cands["candidate_id"]) == sorted(d["candidate_id"] for d in raw["candidates"])
    states = dict(zip(cands["candidate_id"], cands["state"], strict=True))
    assert all(states[d["candidate_id"]] == d["state"] for d in raw["candidates"])
    assert sorted(tasks["task_id"]) == sorted(d["task_id"] for d in raw["tasks"])
    assert {"final", "funnel"} <= set(tasks["level"])


def test_entries_and_phase_diagram_reproduce_the_stored_hull(finished):
    from pymatgen.analysis.phase_diagram import PhaseDiagram

    import amdflow

    with amdflow.open_campaign(finished) as camp:
        entries = camp.entries()
        pd = camp.phase_diagram()
        hull = camp.thermo()
        only_stable = camp.entries(stable=True)
    assert {e.entry_id for e in entries} == set(hull["material_id"])
    assert isinstance(pd, PhaseDiagram)
    for e in entries:  # pymatgen's own hull distance equals the stored one
        stored = hull.loc[hull["material_id"] == e.entry_id, "e_above_hull_eV_per_atom"].item()
        assert pd.get_e_above_hull(e) == pytest.approx(stored, abs=1e-6)
        assert e.data["run_type"] == camp.run_type and "e_above_hull" in e.data
    assert {e.entry_id for e in only_stable} == set(hull.loc[hull["is_stable"], "material_id"])


def test_structure_history_and_prefixes(finished):
    from pymatgen.core import Structure

    import amdflow
    from amdflow.errors import AmdflowError

    raw = _raw(finished)
    done = next(d for d in raw["candidates"] if d["state"] == "analyzed")
    task = next(t for t in raw["tasks"] if t["task_id"] == done["task_id"])
    with amdflow.open_campaign(finished) as camp:
        relaxed = camp.structure(done["candidate_id"][:8])
        unrelaxed = camp.structure(done["candidate_id"], relaxed=False)
        hist = camp.history(done["candidate_id"])
        with pytest.raises(AmdflowError, match="no candidate 'zzz'"):
            camp.structure("zzz")
        first = {d["candidate_id"][0] for d in raw["candidates"]}
        shared = next((c for c in first if sum(d["candidate_id"].startswith(c) for d in raw["candidates"]) > 1), None)
        if shared:
            with pytest.raises(AmdflowError, match="ambiguous"):
                camp.resolve(shared)
    assert relaxed == Structure.from_dict(task["final_structure"])
    assert unrelaxed == Structure.from_dict(done["structure"])
    assert list(hist["stage"]) == ["predict", "dedup", "funnel", "relax", "analyze"]
    assert (hist["launch_state"] == "COMPLETED").all() and (hist["seconds"] >= 0).all()
    assert list(hist["started"]) == sorted(hist["started"])


def test_prefix_range_matches_exactly_the_strings_with_the_prefix():
    """The index range that resolves an id prefix selects what str.startswith selects, edge characters included."""
    import random

    import mongomock

    from amdflow.api import prefix_range

    rng = random.Random(3)
    alphabet = ["0", "9", "a", "f", "z", "~", "-", "_", "\x7f", "\u00e9", "\uffff", "\U0001f600"]
    words = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(3000)}
    coll = mongomock.MongoClient().db.ids
    coll.create_index("candidate_id", unique=True)
    coll.insert_many([{"candidate_id": w} for w in words])
    for prefix in sorted({w[:k] for w in words for k in (1, 2, 3) if len(w) >= k})[:400]:
        got = {d["candidate_id"] for d in coll.find({"candidate_id": prefix_range(prefix)})}
        assert got == {w for w in words if w.startswith(prefix)}, prefix
    assert prefix_range("ab\U0010ffff") == {"$regex": "^ab\U0010ffff"}


def test_open_campaign_writes_nothing_and_leaves_the_store_to_others(finished):
    import amdflow

    out = Path(yaml.safe_load(finished.read_text())["output_dir"])
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir() if p.is_file()}
    with amdflow.open_campaign(finished) as camp:
        camp.thermo()
        camp.candidates()
        camp.history(camp.candidates()["candidate_id"][0])
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir() if p.is_file()}
    assert after == before  # (the lock file too: a reader leaves the holder's pid in it alone)
    with amdflow.open_campaign(finished) as camp:
        # while it is open, the CLI can hold the store (the reader's lock was released once loaded)
        proc = cli("status", str(finished), "--json", cwd=finished.parent)
        assert json.loads(proc.stdout)["candidates"]["analyzed"] >= 1
        assert len(camp.thermo()) >= 3


def test_open_campaign_bad_input_is_one_line(tmp_path, finished):
    import fcntl

    import amdflow
    from amdflow.errors import AmdflowError, StoreBusyError

    with pytest.raises(AmdflowError, match="no such campaign file"):
        amdflow.open_campaign(tmp_path / "missing")
    empty = _campaign(tmp_path, "never-added")
    with pytest.raises(AmdflowError, match="run `amdflow add CAMPAIGN` first"):
        amdflow.open_campaign(empty)
    out = Path(yaml.safe_load(finished.read_text())["output_dir"])
    from amdflow.embedded import LOCK_FILE

    with open(out / LOCK_FILE, "a+") as fh:  # another amdflow process holds the store
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(StoreBusyError, match="in use by another amdflow process"):
            amdflow.open_campaign(finished)
    with amdflow.open_campaign(finished) as camp, pytest.raises(AmdflowError, match="unknown candidate state 'done'"):
        camp.candidates(state="done")


def test_show_on_a_candidate_of_every_state(stepped, unfinished):
    finished, shows = stepped
    for d in _raw(unfinished)["candidates"]:  # the states left at rest in the unfinished campaign, shown now
        if d["state"] not in shows:
            shows[d["state"]] = (d, run_cli("show", unfinished, d["candidate_id"][:10])[1],
                                 json.loads(run_cli("show", unfinished, d["candidate_id"], "--json")[1]))
    assert {s.value for s in CandidateState} <= set(shows), sorted(shows)  # every state, the passing ones mid-run
    for state, (doc, text, rep) in sorted(shows.items()):
        text = " ".join(text.split())  # rich wraps long cells: compare words, not line breaks
        assert doc["candidate_id"] in text and state in text, (state, text)
        assert rep["state"] == state and rep["formula"] == doc["formula"]
        if state == "duplicate":
            assert (rep["dedup"] or {}).get("duplicate_of") or (rep["funnel"] or {}).get("duplicate_of")
            assert "duplicate of" in text
        if state == "screened_out":
            assert "screened out" in text
        if state == "passed":
            assert "dedup not decided yet" in text
        if state in ("unique", "prerelaxed", "over_budget", "relaxed", "analyzed"):
            assert rep["dedup"]["duplicate_of"] is None and "kept" in text
        if state == "prerelaxed":
            assert rep["funnel"]["passed"] is True and [t["level"] for t in rep["tasks"]] == ["funnel"]
        if state == "funnel_cut":
            assert "cut:" in text and rep["funnel"]["passed"] is False
        if state == "over_budget":
            assert rep["funnel"]["passed"] is True and not [t for t in rep["tasks"] if t["level"] == "final"]
        if state == "relaxed":
            assert {t["level"] for t in rep["tasks"]} == {"funnel", "final"}
            assert [h["stage"] for h in rep["history"] if h["launch_id"] is not None][-1] == "relax"
            assert [h["fw_state"] for h in rep["history"] if h["stage"] == "analyze"] == ["READY"]
        if state == "analyzed":
            assert [h["stage"] for h in rep["history"]][-1] == "analyze" and rep["thermo"] and rep["tasks"]
            refs = rep["references"]["final"]["elements"]  # each element's reference, named, on the final hull
            from pymatgen.core import Composition
            assert sorted(refs) == sorted(el.symbol for el in Composition(doc["formula"]).elements)
            assert all(r["name"] and r["energy_per_atom"] < 0 for r in refs.values())
            assert "references (final)" in text and all(f"{el}: {r['name'].split(' ')[0]}" in text for el, r in refs.items())
            assert {t["level"] for t in rep["tasks"]} == {"funnel", "final"}
        if state == "failed":
            assert rep["error"] and rep["error"][:30] in text
        if state == "generated":
            assert "not predicted yet" in text
    # through a real process once: exit status 2 and one line, no traceback
    missing = cli("show", str(finished), "zzz", cwd=finished.parent, check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "no candidate 'zzz'" in missing.stderr


def test_export_round_trips_through_pymatgen_and_ase(finished, tmp_path):
    from ase.io import read as ase_read
    from monty.json import MontyDecoder
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Structure

    import amdflow

    with amdflow.open_campaign(finished) as camp:
        hull = camp.thermo()
        stable_cands = camp.thermo(stable=True, kinds=("candidate",))
        cands = camp.candidates()
        relaxed = {cid: camp.structure(cid) for cid in stable_cands["candidate_id"]}

    def export(*args: str) -> dict:
        code, text, err = run_cli("export", finished, *args)
        assert code == 0, err
        return json.loads(text.strip().splitlines()[-1])

    got = export("--what", "thermo", "--format", "entries", "--out", str(tmp_path / "entries.json"))
    entries = json.loads((tmp_path / "entries.json").read_text(), cls=MontyDecoder)
    assert got["count"] == len(entries) == len(hull)
    pd = PhaseDiagram(entries)
    for e in entries:
        assert pd.get_e_above_hull(e) == pytest.approx(hull.loc[hull["material_id"] == e.entry_id, "e_above_hull_eV_per_atom"].item(), abs=1e-6)

    export("--what", "thermo", "--format", "csv", "--out", str(tmp_path / "thermo.csv"))
    import pandas as pd_

    table = pd_.read_csv(tmp_path / "thermo.csv")
    assert list(table["material_id"]) == list(hull["material_id"])
    assert json.loads(table["decomposes_to"][0])[0]["material_id"]  # JSON text, not a Python repr

    export("--what", "candidates", "--format", "json", "--state", "analyzed", "--state", "duplicate", "--out", str(tmp_path / "c.json"))
    rows = json.loads((tmp_path / "c.json").read_text())
    assert sorted(r["candidate_id"] for r in rows) == sorted(cands.loc[cands["state"].isin(["analyzed", "duplicate"]), "candidate_id"])

    export("--what", "structures", "--format", "cif", "--stable", "--out", str(tmp_path / "cifs"))
    cifs = sorted((tmp_path / "cifs").glob("*.cif"))
    assert len(cifs) == len(relaxed) >= 1
    for f in cifs:
        cid = f.name.split("_")[0]
        assert Structure.from_file(f).matches(relaxed[cid])

    export("--what", "structures", "--format", "poscar", "--stable", "--out", str(tmp_path / "pos"))
    for f in sorted((tmp_path / "pos").glob("*.POSCAR")):
        assert Structure.from_file(f).matches(relaxed[f.name.split("_")[0]])

    got = export("--what", "structures", "--format", "extxyz", "--out", str(tmp_path / "all.extxyz"))
    frames = ase_read(tmp_path / "all.extxyz", index=":")
    assert got["count"] == len(frames) == len(cands)
    assert {f.info["candidate_id"] for f in frames} == set(cands["candidate_id"])

    # a second export replaces the folder whole (nothing stale), and a bad request is one line, nothing written
    export("--what", "structures", "--format", "cif", "--state", "analyzed", "--out", str(tmp_path / "cifs"))
    assert len(list((tmp_path / "cifs").glob("*.cif"))) == int((cands["state"] == "analyzed").sum())
    code, _, err = run_cli("export", finished, "--what", "thermo", "--format", "cif", "--out", tmp_path / "x")
    assert code == 2 and "thermo export as csv, json, entries" in err and not (tmp_path / "x").exists()


def test_export_failure_leaves_the_previous_file(finished, tmp_path, monkeypatch):
    import amdflow
    from amdflow import export as ex
    from amdflow.errors import AmdflowError

    target = tmp_path / "thermo.csv"
    target.write_text("previous\n")
    with amdflow.open_campaign(finished) as camp:
        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("pandas.DataFrame.to_csv", full)
        with pytest.raises(AmdflowError, match=r"No space left on device.*previous file is unchanged"):
            ex.export(camp, "thermo", "csv", target)
    assert target.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["thermo.csv"]


def test_the_example_notebook_runs(finished, tmp_path):
    import nbclient  # test requirements (setup.cfg): a missing install fails here, it does not skip
    import nbformat
    notebook = REPO / "docs" / "examples" / "campaign.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    env_before = os.environ.get("AMDFLOW_CAMPAIGN")
    os.environ["AMDFLOW_CAMPAIGN"] = str(finished)  # the notebook opens the demo's campaign unless told otherwise
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("AMDFLOW_CAMPAIGN", None)
        else:
            os.environ["AMDFLOW_CAMPAIGN"] = env_before
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the phase diagram and the parity plot were drawn
    text = json.dumps([o.get("data", {}).get("text/plain", "") for o in outputs])
    assert "e_above_hull_eV_per_atom" in text or "AlNi" in text


@pytest.mark.parametrize(("what", "fmt"), [("thermo", "json"), ("candidates", "csv"), ("tasks", "csv"), ("tasks", "json"),
                                           ("tasks", "entries"), ("structures", "json")])
def test_every_other_format_reads_back(finished, tmp_path, what, fmt):
    import pandas as pd
    from monty.json import MontyDecoder
    from pymatgen.core import Structure

    import amdflow

    out = tmp_path / f"{what}.{fmt}"
    code, text, err = run_cli("export", finished, "--what", what, "--format", fmt, "--out", out)
    assert code == 0, err
    with amdflow.open_campaign(finished) as camp:
        expected = {"thermo": lambda: camp.thermo()["material_id"], "candidates": lambda: camp.candidates()["candidate_id"],
                    "tasks": lambda: camp.tasks()["task_id"], "structures": lambda: camp.candidates()["candidate_id"]}[what]()
        if fmt == "entries":
            expected = [e.entry_id for e in camp.entries()]
        structures = {cid: camp.structure(cid) for cid in expected} if what == "structures" else {}
    if fmt == "csv":
        got = list(pd.read_csv(out)[{"candidates": "candidate_id", "tasks": "task_id"}[what]])
    elif fmt == "entries":
        got = [e.entry_id for e in json.loads(out.read_text(), cls=MontyDecoder)]
        assert all(type(e).__name__ == "ComputedStructureEntry" for e in json.loads(out.read_text(), cls=MontyDecoder))
    else:
        rows = json.loads(out.read_text())
        key = {"thermo": "material_id", "structures": "candidate_id"}.get(what, "task_id")
        got = [r[key] for r in rows]
        if what == "structures":
            assert all(Structure.from_dict(r["structure"]) == structures[r["candidate_id"]] for r in rows)
    assert sorted(got) == sorted(expected) and got
    assert json.loads(text.strip().splitlines()[-1])["count"] == len(got)

