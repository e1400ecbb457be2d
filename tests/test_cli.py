"""The CLI end to end in separate processes, on the embedded store.

Covers: init, add (twice: the second adds nothing), a second process refused while the
store is held, `kill -9` of `amdflow run` mid-campaign and a restart that completes
without redoing finished Fireworks, status --json, report, rerun, and plain `lpad` on
the same store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def amdflow(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "AMDFLOW_PROGRESS": "false"}
    proc = subprocess.run([sys.executable, "-m", "amdflow", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"amdflow {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_store(path: Path) -> dict:
    import bson.json_util

    return bson.json_util.loads(path.read_text())


def fw_docs(store: dict) -> list[dict]:
    return [doc for _, doc in store["amdflow"]["fireworks"]["documents"]]


def launch_docs(store: dict) -> list[dict]:
    return [doc for _, doc in store["amdflow"]["launches"]["documents"]]


def test_init_refuses_to_overwrite(tmp_path):
    amdflow("init", "c.yaml", cwd=tmp_path)
    proc = amdflow("init", "c.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "exists: pass --force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_campaign_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nelements: [Fe, Qq]\ntemplates: [{source: aflow}]\n")
    proc = amdflow("add", "c.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown element 'Qq'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.fault
def test_campaign_cli_kill_and_resume(tmp_path, binary_campaign_dict):
    campaign = {**binary_campaign_dict, "output_dir": "out"}
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(campaign))
    out = tmp_path / "out"

    first = json.loads(amdflow("add", "campaign.yaml", cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert (first["new_candidates"], first["new_workflows"], first["new_reference_workflows"]) == (6, 6, 2)
    second = json.loads(amdflow("add", "campaign.yaml", cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert (second["new_candidates"], second["new_workflows"], second["new_reference_workflows"]) == (0, 0, 0)

    store_path = out / "launchpad_store.json"
    env = {**os.environ, "AMDFLOW_PROGRESS": "false"}
    runner = subprocess.Popen([sys.executable, "-m", "amdflow", "run", "campaign.yaml"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        completed = 0
        while time.time() < deadline and runner.poll() is None:
            try:
                completed = sum(fw["state"] == "COMPLETED" for fw in fw_docs(read_store(store_path)))
            except (ValueError, KeyError):
                completed = 0
            if completed >= 6:
                break
            time.sleep(0.1)
        assert runner.poll() is None, "run finished before it could be interrupted"
        # a second process is refused at once while the store is held
        busy = amdflow("status", "campaign.yaml", cwd=tmp_path, check=False)
        assert busy.returncode == 2 and "in use by another amdflow process" in busy.stderr
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    before = read_store(store_path)
    done_before = {fw["fw_id"] for fw in fw_docs(before) if fw["state"] == "COMPLETED"}
    assert len(done_before) >= 6

    amdflow("run", "campaign.yaml", cwd=tmp_path)
    after = read_store(store_path)
    states = {fw["fw_id"]: fw["state"] for fw in fw_docs(after)}
    assert set(states.values()) <= {"COMPLETED", "DEFUSED"}
    assert done_before <= {i for i, s in states.items() if s == "COMPLETED"}
    finished = [ln for ln in launch_docs(after) if ln["state"] == "COMPLETED"]
    per_fw = {}
    for ln in finished:
        per_fw[ln["fw_id"]] = per_fw.get(ln["fw_id"], 0) + 1
    assert all(n == 1 for n in per_fw.values()), per_fw  # nothing redone, nothing duplicated

    status = json.loads(amdflow("status", "campaign.yaml", "--json", cwd=tmp_path).stdout)
    assert status["candidates_total"] == 6
    assert status["candidates"]["analyzed"] + status["candidates"]["duplicate"] + status["candidates"]["screened_out"] == 6
    assert status["candidates"]["duplicate"] >= 1
    assert status["thermo"]["stable_candidates"] >= 1
    assert status["references"] == {"relaxed": 2}
    times = status["stage_times"]
    assert times["reference"]["launches"] == 2 and times["predict"]["launches"] == 6
    assert times["relax"]["total_s"] > 0
    assert 0 < times["predict"]["wall_s"] <= times["predict"]["total_s"] + 0.01  # one after another here: wall ~ summed

    report = amdflow("report", "campaign.yaml", cwd=tmp_path)
    assert "AlNi" in report.stdout
    assert (out / "promising" / "summary.csv").exists() and (out / "phase_diagram.png").exists()
    assert not any(p.name.startswith(".promising") for p in out.iterdir())  # no temp folders left
    promising = json.loads((out / "promising" / "summary.json").read_text())
    assert promising and all(r["min_bond_ratio"] > 0.5 for r in promising)  # each row's generated shortest bond
    assert "report: " in report.stderr and (out / "report.html").exists() and (out / "phase_diagram.html").exists()
    page = (out / "report.html").read_text()
    assert "AlNi-test" in page and page.count('<tr class="stable">') == status["thermo"]["stable_candidates"]
    from tests.test_report import CHROMIUM, chromium_check

    if CHROMIUM:
        chromium_check(out / "report.html", tmp_path)
    hull = amdflow("hull", "campaign.yaml", cwd=tmp_path)
    assert "0 hull system(s) rebuilt" in hull.stderr  # the report just built it: nothing changed
    full = amdflow("hull", "campaign.yaml", "--full", cwd=tmp_path)
    assert "rebuilt Al-Ni" in full.stderr

    watched = amdflow("status", "campaign.yaml", "--watch", "--interval", "0.2", cwd=tmp_path)
    assert "COMPLETED" in watched.stdout  # finished campaign: one refresh, then exit

    rerun = amdflow("rerun", "campaign.yaml", "--fizzled", cwd=tmp_path)
    assert "reset 0 FIZZLED" in rerun.stderr
    lost = amdflow("rerun", "campaign.yaml", "--lost", "--lost-after", "0", cwd=tmp_path)  # a finished campaign: nothing lost
    said = " ".join(lost.stderr.split())  # the console wraps long lines
    assert "lost launches: 0" in said and "released 0 stale claims and 0 stale workflow locks" in said

    lpad = subprocess.run([str(BIN / "lpad"), "-l", "my_launchpad.yaml", "get_wflows", "-d", "ids"], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert lpad.returncode == 0, lpad.stderr
    wf_ids = json.loads(lpad.stdout[lpad.stdout.index("["):])
    assert len(wf_ids) == 8  # 6 candidate + 2 reference workflows


def test_generate_dry_run_and_bad_inputs(tmp_path):
    from pymatgen.core import Lattice, Structure

    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(folder / "CsCl.cif"))
    campaign = {"name": "gen", "elements": ["Fe", "Al", "Ni"],
                "templates": [{"source": "folder", "path": "templates"}, {"source": "aflow", "prototypes": ["AB2C_cF16_225_a_c_b"]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(campaign))
    proc = amdflow("generate", "c.yaml", "--dry-run", "--json", cwd=tmp_path)
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    # the malformed CIF is reported, the other templates still give candidates
    assert "skipped 1 template(s), unreadable: folder:broken.cif" in proc.stderr
    assert (plan["templates_read"], plan["templates_skipped"]) == (2, 1)
    assert (plan["assignments"], plan["after_symmetry"], plan["candidates"]) == (12, 6, 6)
    assert plan["estimated_bytes"]["total"] > plan["estimated_bytes"]["candidates"] > 0
    assert not (tmp_path / "gen").exists()  # a dry run writes nothing

    stored = amdflow("generate", "c.yaml", "--json", cwd=tmp_path)
    assert json.loads(stored.stdout.strip().splitlines()[-1])["new_candidates"] == 6
    again = amdflow("generate", "c.yaml", "--json", cwd=tmp_path)
    assert json.loads(again.stdout.strip().splitlines()[-1])["new_candidates"] == 0

    (tmp_path / "empty").mkdir()
    cases = [
        ({**campaign, "templates": [{"source": "folder", "path": "empty"}]}, "holds no *.cif"),
        ({**campaign, "elements": ["Fe", "Xq"]}, "unknown element 'Xq'"),
        ({**campaign, "elements": ["Fe", "Kr"]}, "are in generate.exclude_elements"),
    ]
    for bad, message in cases:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        proc = amdflow("generate", "bad.yaml", "--dry-run", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_campaign_of_only_the_required_keys_runs_every_stage_and_builds_a_hull(tmp_path):
    """name, elements and templates (a folder: its path is required) and nothing else: every default is the
    validated one, so the default references (each element's ground state: fcc Al and Ni) relax and the hull is
    built (issues 13, 25)."""
    from amdflow.generate.templates import aflow_structure

    folder = tmp_path / "templates"
    folder.mkdir()
    for label in ("AB_cP2_221_b_a", "AB3_cP4_221_a_c"):  # B2 and L1_2
        aflow_structure(label).to(filename=str(folder / f"{label}.cif"))
    (tmp_path / "campaign.yaml").write_text("name: AlNi-minimal\nelements: [Al, Ni]\ntemplates:\n  - source: folder\n    path: templates\n")

    amdflow("add", "campaign.yaml", cwd=tmp_path)
    run = amdflow("run", "campaign.yaml", cwd=tmp_path)
    assert "Traceback" not in run.stderr, run.stderr
    status = json.loads(amdflow("status", "campaign.yaml", "--json", cwd=tmp_path).stdout)
    assert status["references"] == {"relaxed": 2}  # 2 elements x their ground state, none fizzled
    funnel = status["funnel"]  # on by default: SevenNet-0 before the final CHGNet relax, references of its own
    assert funnel["run_type"].startswith("sevennet-7net-0-0.13.0-mp2020-") and funnel["references"] == {"relaxed": 2}
    assert "-mp2020-in-model-" in status["run_type"]  # CHGNet's energies carry MP2020 already: nothing applied
    assert funnel["relaxed"] >= 1 and funnel["passed"] >= 1 and status["run_type"].startswith("chgnet-")
    assert status["fireworks"].get("FIZZLED", 0) == 0, status["fireworks"]
    assert status["candidates_total"] == 3  # B2 AlNi, L1_2 AlNi3 and Al3Ni
    assert status["candidates"]["analyzed"] >= 1
    assert status["thermo"]["materials"] >= 3 and status["thermo"]["stable_candidates"] >= 1
    out = tmp_path / "AlNi-minimal"
    assert (out / "phase_diagram.png").exists() and (out / "promising" / "summary.csv").exists()
    store = read_store(out / "launchpad_store.json")
    refs = sorted(doc["prototype"] for _, doc in store["amdflow"]["references"]["documents"])
    assert refs == ["ground_state"] * 4  # the default, x 2 elements x 2 levels
    amdflow("report", "campaign.yaml", cwd=tmp_path)
    html = (out / "report.html").read_text()
    assert "Al: fcc [ground state; MP mp-134]" in html and "Ni: fcc [ground state; MP" in html  # named in the report
    # the funnel relaxed its candidates as one batch (after every dedup), not one after another as each dedup finished
    funnel_fws = [fw for fw in fw_docs(store) if fw["spec"].get("amdflow_stage") == "funnel" and fw["state"] == "COMPLETED"]
    assert len(funnel_fws) >= 2, [fw["name"] for fw in funnel_fws]
    launched = {doc["launch_id"]: doc for doc in launch_docs(store)}
    spans = [(launched[fw["launches"][-1]]["time_start"], launched[fw["launches"][-1]]["time_end"]) for fw in funnel_fws]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans  # all ran at once


@pytest.mark.slow
def test_run_of_hundreds_of_candidates_prints_no_traceback(tmp_path):
    """`amdflow run` on a few hundred candidates (batched predict and dedup, FireWorks' rocket for the rest) on the
    embedded store: no traceback on stderr (FireWorks' ping thread used to print "No Launch exists" ones), and every
    Firework finishes. ``relax.budget: 0`` keeps relaxations out: each relax Firework completes as over_budget."""
    campaign = {
        "name": "many", "elements": ["Ni", "Al"], "templates": [{"source": "aflow", "max_sites": 4}],
        # the volume rule alone: every lattice scale kept (the bond floor is tested in tests/test_generate.py)
        "generate": {"lattice_scales": [0.98, 1.0, 1.02], "min_bond_ratio": 0.0}, "screen": {"max_formation_energy_per_atom": 0.5},
        "funnel": {"engine": "none"}, "relax": {"budget": 0, "reference_prototypes": ["fcc"], "max_steps": 50},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign))
    added = json.loads(amdflow("add", str(path), cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert added["new_candidates"] >= 200
    run = amdflow("run", str(path), cwd=tmp_path)
    assert "Traceback" not in run.stderr and "Error" not in run.stderr, run.stderr[-3000:]
    status = json.loads(amdflow("status", str(path), "--json", cwd=tmp_path).stdout)
    assert set(status["fireworks"]) <= {"COMPLETED", "DEFUSED"}
    assert status["candidates"]["over_budget"] >= 10 and status["candidates"]["relaxed"] == 0
    assert status["budget"]["used"] == 0
