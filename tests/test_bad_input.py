"""Bad input and hostile names: one clear line, nothing half-written, the rest carries on.

The whole table of cases is docs/errors.md; cases tested elsewhere are listed there with
their test. This file holds the ones that had no test of their own.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from amdflow.campaign import load_campaign
from amdflow.db import open_db, redact
from amdflow.errors import AmdflowError, ConfigError
from amdflow.report import PromisingRow, write_promising
from amdflow.settings import get_settings

REPO = Path(__file__).resolve().parents[1]


def _row(cid: str, formula: str = "AlNi") -> PromisingRow:
    return PromisingRow(cid, formula, "Pm-3m", -0.6, 0.0, -0.1, True, "1.000 AlNi", -0.5, "aflow:AB_cP2_221_b_a", f"{cid}-chgnet")


def _structure() -> Structure:
    return Structure(Lattice.cubic(2.9), ["Al", "Ni"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.mark.parametrize("uri_host", [True, False], ids=["password-in-uri", "password-field"])
def test_credentials_never_in_error_messages(tmp_path, uri_host):
    lp_file = tmp_path / "my_launchpad.yaml"
    if uri_host:
        lp_file.write_text("host: mongodb://alice:hunter2@127.0.0.1:1/amdflow?authSource=admin\nname: amdflow\n"
                           "mongoclient_kwargs:\n  serverSelectionTimeoutMS: 300\n")
    else:
        lp_file.write_text("host: 127.0.0.1\nport: 1\nname: amdflow\nusername: alice\npassword: hunter2\n"
                           "mongoclient_kwargs:\n  serverSelectionTimeoutMS: 300\n")
    start = time.perf_counter()
    with pytest.raises(AmdflowError, match="cannot reach MongoDB") as info, open_db(None, get_settings(launchpad_file=lp_file)):
        pass
    assert time.perf_counter() - start < 10
    assert "hunter2" not in str(info.value)
    assert redact("mongodb+srv://bob:p%40ss@cluster0.example.net/db") == "mongodb+srv://bob:***@cluster0.example.net/db"


def test_disk_full_while_writing_promising_keeps_the_previous_folder(tmp_path, monkeypatch):
    from pymatgen.io.vasp import Poscar

    folder = write_promising(tmp_path / "promising", [_row("aaa")], {"aaa": _structure()})
    before = sorted(p.name for p in folder.iterdir())
    calls = {"n": 0}
    original = Poscar.write_file

    def full_disk(self, filename, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, filename, **kwargs)

    monkeypatch.setattr(Poscar, "write_file", full_disk)
    with pytest.raises(AmdflowError) as info:
        write_promising(tmp_path / "promising", [_row("bbb"), _row("ccc")], {"bbb": _structure(), "ccc": _structure()})
    message = str(info.value)
    assert "No space left on device" in message and "free disk space" in message and "\n" not in message
    assert sorted(p.name for p in folder.iterdir()) == before  # the previous folder, whole
    assert [p.name for p in tmp_path.iterdir()] == ["promising"]  # no half-written temp folder


def test_disk_full_while_writing_plots_and_report(tmp_path, monkeypatch):
    from amdflow.report.html import ReportData, write_report

    (tmp_path / "report.html").write_text("previous")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(AmdflowError, match=r"could not write .*report.html \(No space left on device\)"):
        write_report(tmp_path, ReportData(campaign="c", chemsys="Al-Ni", summary={}, counts={}))
    monkeypatch.undo()
    assert (tmp_path / "report.html").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_concurrent_refreshes_of_promising_never_fail_or_leave_debris(tmp_path):
    errors: list[BaseException] = []

    def refresh(worker: int) -> None:
        try:
            for i in range(6):
                cid = f"w{worker}i{i}"
                write_promising(tmp_path / "promising", [_row(cid)], {cid: _structure()})
        except BaseException as err:  # collected: the assertion below shows it
            errors.append(err)

    threads = [threading.Thread(target=refresh, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [p.name for p in tmp_path.iterdir()] == ["promising"]
    data = json.loads((tmp_path / "promising" / "summary.json").read_text())
    assert len(data) == 1 and (tmp_path / "promising" / data[0]["cif"]).exists()  # one whole version, not a mix


def test_yaml_is_only_ever_safe_loaded(tmp_path):
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load|load_all)\(|Loader\s*=|UnsafeLoader|FullLoader")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "amdflow").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(line)]
    assert offenders == []
    marker = tmp_path / "pwned"
    (tmp_path / "c.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nelements: [Fe, Al]\n"
                                     "templates: [{{source: aflow}}]\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_campaign(tmp_path / "c.yaml")
    assert not marker.exists()


def test_hostile_template_names_cannot_escape_the_output_folder(tmp_path):
    """Template files named like paths or shell code: ids stay data, every write stays in the campaign folder."""
    from amdflow.campaign import campaign_from_dict
    from amdflow.ops import add_campaign

    folder = tmp_path / "templates" / "..%2f..%2fetc"
    folder.mkdir(parents=True)
    _structure().to(filename=str(folder / "..evil;rm -rf ~.cif"))
    l12 = Structure(Lattice.cubic(3.6), ["Al", "Ni", "Ni", "Ni"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    l12.to(filename=str(folder / "$(touch pwned).vasp"), fmt="poscar")
    cfg = campaign_from_dict({"name": "hostile", "elements": ["Fe", "Co"], "templates": [{"source": "folder", "path": str(tmp_path / "templates")}],
                              "output_dir": str(tmp_path / "out")})
    before = {p for p in tmp_path.rglob("*")}
    with open_db(cfg.output_dir, get_settings()) as db:
        report = add_campaign(db, cfg)
        assert report.new_candidates == 3  # B2 once, L1_2 twice (FeCo3, Fe3Co)
        ids = {c["template"]["template_id"] for c in db.candidates.find()}
        assert ids == {"..%2f..%2fetc/..evil;rm -rf ~.cif", "..%2f..%2fetc/$(touch pwned).vasp"}
        assert all(re.fullmatch(r"[0-9a-f]+", c["candidate_id"]) for c in db.candidates.find())
        rows = [_row(c["candidate_id"], c["formula"]) for c in db.candidates.find()]
        structures = {c["candidate_id"]: Structure.from_dict(c["structure"]) for c in db.candidates.find()}
        write_promising(cfg.output_dir / "promising", rows, structures)
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.resolve().is_relative_to((tmp_path / "out").resolve()) for p in new), sorted(map(str, new))
    assert not (tmp_path / "pwned").exists() and not Path(os.getcwd(), "pwned").exists()


@pytest.mark.slow
@pytest.mark.fault
def test_relax_engine_raising_fizzles_alone_with_its_reason_and_reruns(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    from amdflow.campaign import campaign_from_dict
    from amdflow.ops import add_campaign, rerun_fizzled
    from amdflow.relax.chgnet_engine import CHGNetEngine

    original = CHGNetEngine.relax

    def flaky(self, structure, directory=None):
        if structure.composition.reduced_formula == "AlNi3":
            raise RuntimeError("simulated engine crash (segfault in the potential)")
        return original(self, structure, directory)

    monkeypatch.setattr(CHGNetEngine, "relax", flaky)
    cfg = campaign_from_dict(binary_campaign_dict)
    add_campaign(db, cfg)
    cwd = os.getcwd()
    (tmp_path / "launches").mkdir()
    os.chdir(tmp_path / "launches")
    try:
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"]), strm_lvl="ERROR")
        bad = db.candidates.find_one({"formula": "AlNi3", "state": "failed"})
        assert bad["error"] == "relax: RuntimeError: simulated engine crash (segfault in the potential)"
        relax_fw = lpad.get_fw_by_id(bad["fw_ids"]["relax"])
        assert relax_fw.state == "FIZZLED"
        assert "simulated engine crash" in relax_fw.launches[-1].action.stored_data["_exception"]["_stacktrace"]
        assert lpad.get_fw_by_id(bad["fw_ids"]["analyze"]).state == "WAITING"
        others = {fw["state"] for fw in lpad.fireworks.find({"fw_id": {"$nin": [bad["fw_ids"]["relax"], bad["fw_ids"]["analyze"]]}})}
        assert others <= {"COMPLETED", "DEFUSED"}  # nobody else blocked
        assert db.thermo.count_documents({"hull_chemsys": "Al-Ni", "kind": "candidate"}) >= 2
        # the engine is fixed: rerun the fizzled Firework, the candidate finishes, nothing else runs twice
        monkeypatch.setattr(CHGNetEngine, "relax", original)
        assert rerun_fizzled(db, cfg.name).reset == [bad["fw_ids"]["relax"]]
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"]), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)
    assert db.candidates.find_one({"candidate_id": bad["candidate_id"]})["state"] == "analyzed"
    assert {fw["state"] for fw in lpad.fireworks.find({}, {"state": 1})} <= {"COMPLETED", "DEFUSED"}
    for fw in lpad.fireworks.find({"state": "COMPLETED"}):
        assert lpad.launches.count_documents({"fw_id": fw["fw_id"], "state": "COMPLETED"}) == 1


def test_missing_cp2k_executable_is_one_clear_error(binary_campaign_dict, tmp_path, monkeypatch):
    from amdflow.campaign import campaign_from_dict
    from amdflow.relax import get_engine
    from amdflow.relax.base import require_executable
    from amdflow.stages import reference_structure

    launchers = tmp_path / "bin"  # an mpirun that exists (Debian's comes with CP2K, which this machine may lack)
    launchers.mkdir()
    (launchers / "mpirun").write_text("#!/bin/sh\nexit 0\n")
    (launchers / "mpirun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{launchers}{os.pathsep}{os.environ['PATH']}")
    cfg = campaign_from_dict({**binary_campaign_dict, "relax": {"engine": "cp2k", "reference_prototypes": ["fcc"]}})
    engine = get_engine(cfg.relax, env={"cp2k_cmd": "mpirun -np 2 no-such-cp2k.psmp"})
    with pytest.raises(AmdflowError, match=r"CP2K command .*'no-such-cp2k.psmp' not found or not executable"):
        engine.relax(reference_structure("Al", "A_cF4_225_a"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    require_executable("python -m amdflow.testing.fake_vasp", "VASP", "x")  # python -m module: python is checked
    with pytest.raises(AmdflowError, match="cannot be parsed"):
        require_executable("srun 'vasp_std", "VASP", "x")


def test_template_with_more_elements_than_targets_is_skipped_with_reason():
    from tests.test_generate import aflow, cfg, run

    docs, report = run(cfg(["Fe", "Al"], aflow("AB2C_cF16_225_a_c_b", "AB_cP2_221_b_a")))
    assert dict(report.templates.skipped) == {"aflow:AB2C_cF16_225_a_c_b": "more elements than targets (3 > 2)"}
    assert {d["formula"] for d in docs} == {"AlFe"}  # the binary template still gives its candidate


def test_relax_outputs_missing_are_named(tmp_path):
    from amdflow.relax.cp2k import parse_cp2k_dir
    from amdflow.relax.vasp.parse import parse_vasp_dir

    (tmp_path / "vasp").mkdir()
    (tmp_path / "cp2k").mkdir()
    with pytest.raises(AmdflowError, match=r"no vasprun.xml in .*vasp: the VASP run left no output \(check vasp.out"):
        parse_vasp_dir(tmp_path / "vasp")
    with pytest.raises(AmdflowError, match=r"no cp2k.out in .*cp2k: CP2K left no output"):
        parse_cp2k_dir(tmp_path / "cp2k")


def test_candidate_with_a_hand_edited_state_is_counted_not_hidden(db, binary_campaign_dict):
    from amdflow.campaign import campaign_from_dict
    from amdflow.ops import add_campaign, campaign_status

    cfg = campaign_from_dict(binary_campaign_dict)
    add_campaign(db, cfg)
    cid = db.candidates.find_one({})["candidate_id"]
    db.candidates.update_one({"candidate_id": cid}, {"$set": {"state": "done!!"}})
    db.candidates.update_one({"candidate_id": {"$ne": cid}}, {"$unset": {"state": ""}})  # one without a state at all
    status = campaign_status(db, cfg.name)
    assert status["candidates"]["invalid"] == 2 and status["candidates_total"] == 6
    assert sum(status["candidates"].values()) == 6


# ---------------------------------------------------------------- the user's view: every config case through the CLI
_GOOD = {"name": "cli-errors", "elements": ["Fe", "Al"], "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}]}
_CLI_CASES = {
    "yaml-syntax": ("name: x\nelements: [Fe, Al\n", "YAML syntax error at line"),
    "unknown-key": ({**_GOOD, "dedup": {"ltoll": 0.2}}, "unknown key 'dedup.ltoll'"),
    "wrong-type": ({**_GOOD, "relax": {"max_steps": "many"}}, "key 'relax.max_steps'"),
    "negative-threshold": ({**_GOOD, "analyze": {"promising_e_above_hull": -1}}, "key 'analyze.promising_e_above_hull'"),
    "unknown-element": ({**_GOOD, "elements": ["Fe", "Xq"]}, "unknown element 'Xq'"),
    "excluded-element": ({**_GOOD, "elements": ["Fe", "Kr"]}, "are in generate.exclude_elements"),
    "escaping-name": ({**_GOOD, "name": "../../etc"}, "key 'name'"),
    "missing-folder": ({**_GOOD, "templates": [{"source": "folder", "path": "nowhere"}]}, "nowhere does not exist: fix templates[].path"),
    "unknown-prototype": ({**_GOOD, "templates": [{"source": "aflow", "prototypes": ["AB_cP2_999"]}]}, "unknown AFLOW prototype label"),
    "unknown-reference-prototype": ({**_GOOD, "relax": {"reference_prototypes": ["fcc", "fcx"]}},
                                    "'fcx' is neither a short name (fcc, bcc, hcp, diamond, sc) nor a one-element label"),
}


@pytest.mark.parametrize("case", sorted(_CLI_CASES))
def test_user_errors_through_the_cli_are_one_line_without_traceback(tmp_path, case):
    """`amdflow add` on a bad campaign file: exit 2, one line naming the problem, no traceback, nothing written."""
    import subprocess
    import sys

    import yaml

    content, message = _CLI_CASES[case]
    (tmp_path / "c.yaml").write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    proc = subprocess.run([sys.executable, "-m", "amdflow", "add", "c.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "AMDFLOW_PROGRESS": "false"})
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and message in err, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


def test_unreachable_mongodb_through_the_cli_within_10_s(tmp_path, monkeypatch):
    """`amdflow add` with a LaunchPad file pointing at a port nobody listens on, with the default timeout:
    one line naming the host and the fix, within 10 s (a fresh process adds its start-up, ~2 s here)."""
    import socket

    import yaml
    from typer.testing import CliRunner

    from amdflow.cli import app

    with socket.socket() as sock:  # a free port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "lp.yaml").write_text(yaml.safe_dump({"host": f"mongodb://amdflow:s3cret@127.0.0.1:{port}/", "name": "amdflow"}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_GOOD))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMDFLOW_PROGRESS", "false")
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["add", "c.yaml", "--launchpad", "lp.yaml"])
    wall = time.monotonic() - t0
    err = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "cannot reach MongoDB" in err and f"127.0.0.1:{port}" in err, result.stderr
    assert "s3cret" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert wall < 10, f"took {wall:.1f} s"
