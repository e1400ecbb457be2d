"""VASP inputs, Custodian jobs/handlers and parsing, against known answers and real VASP files.

Real outputs and error cases live in ../shared/vasp (present in CI, absent in a fresh
clone: those tests skip). No POTCARs are needed: inputs are written with POTCAR.spec.
"""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from amdflow.campaign import VaspConfig, VaspJobType
from tests.conftest import SHARED, shared_path


def _fein3() -> Structure:
    return Structure(Lattice.cubic(4.2), ["Fe", "In", "In", "In"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def _element(symbol: str, a: float) -> Structure:
    return Structure(Lattice.cubic(a), [symbol] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


# ---------------------------------------------------------------- inputs
def test_candidate_and_reference_inputs_share_every_setting(tmp_path):
    """FeIn3 and the elemental Fe and In references: same ENCUT, EDIFF rule, k-point density, spin, U, POTCARs."""
    from amdflow.relax.vasp import settings_differences, settings_fingerprint, write_inputs

    cfg = VaspConfig(incar={"ENCUT": 600}, potcars={"Fe": "Fe_pv"}, kpoint_density=100)
    cand = settings_fingerprint(_fein3(), cfg)
    for ref in (_element("Fe", 3.6), _element("In", 4.7)):
        assert settings_differences(cand, settings_fingerprint(ref, cfg)) == []
    assert cand["ENCUT"] == 600 and cand["ISPIN"] == 2 and cand["potcar_by_element"] == {"Fe": "Fe_pv", "In": "In_d"}
    assert cand["MAGMOM_BY_ELEMENT"] == {"Fe": 5.0, "In": 0.6}
    # the files: POTCAR symbols in the structure's own species order (not the campaign's element order)
    write_inputs(_fein3(), cfg, tmp_path / "c", potcar_spec=True)
    species = (tmp_path / "c" / "POSCAR").read_text().splitlines()[5].split()
    assert (tmp_path / "c" / "POTCAR.spec").read_text().split() == [{"Fe": "Fe_pv", "In": "In_d"}[s] for s in species]
    kpts = (tmp_path / "c" / "KPOINTS").read_text().splitlines()
    assert kpts[2].strip().lower().startswith(("gamma", "monkhorst"))  # a real mesh, never a missing KPOINTS


def test_the_fingerprint_sees_a_different_setting():
    """The comparison can fail: other k-points, spin off or another POTCAR are reported."""
    from amdflow.relax.vasp import settings_differences, settings_fingerprint

    base = settings_fingerprint(_fein3(), VaspConfig())
    other = settings_fingerprint(_element("Fe", 3.6), VaspConfig(kpoint_density=32, spin="off", potcars={"Fe": "Fe"}))
    diffs = "\n".join(settings_differences(base, other))
    assert "reciprocal_density" in diffs and "ISPIN" in diffs and "potcar_by_element[Fe]" in diffs


def test_spin_and_hubbard_policies():
    from amdflow.relax.vasp.inputs import input_set

    fe2o3 = Structure(Lattice.cubic(4.0), ["Fe", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert input_set(fe2o3, VaspConfig()).incar["LDAU"] is True  # MP: U for Fe in an oxide
    off = input_set(fe2o3, VaspConfig(hubbard="off")).incar
    assert not off.get("LDAU") and "LDAUU" not in off
    al = _element("Al", 4.05)
    assert input_set(al, VaspConfig(spin="auto")).incar.get("ISPIN", 1) == 1 and "MAGMOM" not in input_set(al, VaspConfig(spin="auto")).incar
    assert input_set(_fein3(), VaspConfig(spin="auto")).incar["ISPIN"] == 2
    assert input_set(al, VaspConfig(spin="on")).incar["ISPIN"] == 2


def test_bad_vasp_settings_are_config_errors():
    from amdflow.campaign import campaign_from_dict
    from amdflow.errors import ConfigError

    base = {"name": "x", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}]}
    with pytest.raises(ConfigError, match="upper-case"):
        campaign_from_dict({**base, "relax": {"vasp": {"incar": {"encut": 500}}}})
    with pytest.raises(ConfigError, match="unknown handler"):
        campaign_from_dict({**base, "relax": {"vasp": {"handlers": ["default", "NoSuchHandler"]}}})
    with pytest.raises(ConfigError, match="job"):
        campaign_from_dict({**base, "relax": {"vasp": {"job": "triple_relax"}}})


def test_missing_potcars_is_one_clear_error(tmp_path, monkeypatch):
    from pymatgen.core import SETTINGS

    from amdflow.errors import AmdflowError
    from amdflow.relax.vasp import write_inputs

    monkeypatch.setitem(SETTINGS, "PMG_VASP_PSP_DIR", str(tmp_path / "no-potcars"))
    with pytest.raises(AmdflowError, match="PMG_VASP_PSP_DIR"):
        write_inputs(_fein3(), VaspConfig(), tmp_path / "run")


# ---------------------------------------------------------------- Custodian jobs and handlers
@pytest.mark.parametrize("job_type", list(VaspJobType))
def test_job_sequences(job_type):
    from amdflow.relax.vasp import build_jobs

    jobs = build_jobs(job_type, "mpirun -n 4 vasp_std")
    suffixes = [j.suffix for j in jobs]
    expected = {"double_relax_static": [".relax1", ".relax2", ".static"], "double_relax": [".relax1", ".relax2"],
                "relax": [""], "static": [""]}[job_type.value]
    assert suffixes == expected
    assert all(list(j.vasp_cmd) == ["mpirun", "-n", "4", "vasp_std"] for j in jobs)
    assert [j.final for j in jobs] == [False] * (len(jobs) - 1) + [True]
    if job_type is VaspJobType.DOUBLE_RELAX_STATIC:
        incar_set = next(o for o in jobs[-1].settings_override if o.get("dict") == "INCAR")["action"]["_set"]
        assert incar_set["NSW"] == 0 and incar_set["IBRION"] == -1


def test_handler_groups_by_name():
    from amdflow.relax.vasp import HANDLER_GROUPS, build_handlers

    names = [type(h).__name__ for h in build_handlers(["default", "walltime", "VaspErrorHandler"])]
    assert names == [*HANDLER_GROUPS["default"], "WalltimeHandler"]  # each once, in order
    assert {"VaspErrorHandler", "UnconvergedErrorHandler", "NonConvergingErrorHandler", "FrozenJobErrorHandler",
            "PositiveEnergyErrorHandler"} <= set(names)


def _error_cases() -> list[tuple[str, str, list[str]]]:
    """(folder, handler call, error names) for every README row whose check() fires with a plain call."""
    readme = SHARED / "vasp" / "README.md"
    if not readme.exists():
        return []
    text = readme.read_text()
    table = text[text.index("## Errors - summary"):text.index("## Runs - details")]
    cases = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[2] != "True":
            continue
        m = re.fullmatch(r"`(\w+\([^()]*\))`", cells[1])
        if m:
            names = re.findall(r"`(\w+)`", cells[3])
            cases.append((cells[0], m.group(1), names))
    return cases


def _quiet_cases() -> list[tuple[str, str]]:
    """(folder, handler call) for README rows whose plain handler call does NOT fire (check() False)."""
    readme = SHARED / "vasp" / "README.md"
    if not readme.exists():
        return []
    text = readme.read_text()
    table = text[text.index("## Errors - summary"):text.index("## Runs - details")]
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[2] == "False" and (m := re.fullmatch(r"`(\w+\([^()]*\))`", cells[1])):
            out.append((cells[0], m.group(1)))
    return out


@pytest.mark.parametrize("folder,call", _quiet_cases() or [pytest.param("-", "-", marks=pytest.mark.skip(
    reason="needs ../shared/vasp (reference data, present in CI, absent in a fresh clone)"))])
def test_shared_case_where_the_handler_must_stay_quiet(folder, call, tmp_path, monkeypatch):
    """The known negatives of the README: these handler calls must not fire on these outputs."""
    from custodian.vasp import handlers as vh

    work = tmp_path / folder
    shutil.copytree(shared_path("vasp", "errors", folder), work)
    monkeypatch.chdir(work)
    handler = eval(call, {k: getattr(vh, k) for k in dir(vh) if k.endswith("Handler")})
    assert not handler.check()


def test_every_shared_error_case_is_listed():
    shared_path("vasp", "errors")
    assert len(_error_cases()) >= 40


@pytest.mark.parametrize("folder,call,names", _error_cases() or [pytest.param("-", "-", [], marks=pytest.mark.skip(
    reason="needs ../shared/vasp (reference data, present in CI, absent in a fresh clone)"))])
def test_shared_error_fires_its_handler_and_the_correction_is_applied(folder, call, names, tmp_path, monkeypatch):
    """The handler named in the README fires on the real VASP output, and its correction changes the inputs."""
    from custodian.vasp import handlers as vh

    src = shared_path("vasp", "errors", folder)
    work = tmp_path / folder
    shutil.copytree(src, work)
    monkeypatch.chdir(work)
    handler = eval(call, {k: getattr(vh, k) for k in dir(vh) if k.endswith("Handler")})
    assert handler.check() is True
    if names:
        assert set(names) <= set(getattr(handler, "errors", set())), (handler.errors, names)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    try:
        result = handler.correct()
    except FileNotFoundError as err:  # the shared folder holds the stdout only, not the file the correction reads
        pytest.skip(f"{folder}: the correction reads {Path(err.filename).name}, which the shared folder does not hold")
    assert result["errors"], result
    after = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    if result.get("actions"):  # an action was taken: it shows in the folder (INCAR/KPOINTS/POSCAR changed or files added)
        assert after != before, result
    else:  # nothing can be done: custodian says so, and the run will fail with the reason
        assert result["actions"] in (None, [])


# ---------------------------------------------------------------- parsing
def _runs() -> list[str]:
    root = SHARED / "vasp" / "runs"
    return sorted(p.name for p in root.iterdir() if (p / "outputs").is_dir()) if root.exists() else []


@pytest.mark.parametrize("run", _runs() or [pytest.param("-", marks=pytest.mark.skip(
    reason="needs ../shared/vasp (reference data, present in CI, absent in a fresh clone)"))])
def test_shared_runs_parse_to_pymatgens_energy(run):
    from pymatgen.io.vasp.outputs import Vasprun

    from amdflow.relax.vasp import parse_vasp_dir

    out = shared_path("vasp", "runs", run, "outputs")
    doc = parse_vasp_dir(out)
    ref = Vasprun(str(out / doc["final_run"]), parse_potcar_file=False, parse_dos=False, parse_eigen=False)
    assert doc["energy_per_atom"] == pytest.approx(ref.final_energy / len(ref.final_structure), abs=1e-9)
    assert doc["nsites"] == len(ref.final_structure) and doc["potcar_symbols"] == list(ref.potcar_symbols)
    assert doc["converged_electronic"] and doc["incar"]


def test_known_energies_of_shared_runs():
    """Values from ../shared/vasp/README.md (pymatgen on the same files)."""
    from amdflow.relax.vasp import parse_vasp_dir

    known = {"feo_ggau_relax": -7.054629, "si_static": -5.423391, "al_nscf_uniform": -3.744590, "si_double_relax": -5.423439}
    for run, e in known.items():
        doc = parse_vasp_dir(shared_path("vasp", "runs", run, "outputs"))
        assert doc["energy_per_atom"] == pytest.approx(e, abs=2e-6), run
    feo = parse_vasp_dir(shared_path("vasp", "runs", "feo_ggau_relax", "outputs"))
    assert feo["is_hubbard"] and feo["total_magnetization"] is not None and feo["n_ionic_steps"] == 28
    assert parse_vasp_dir(shared_path("vasp", "runs", "si_double_relax", "outputs"))["final_run"].startswith("vasprun.xml.relax2")


def test_truncated_vasprun_is_a_clear_error(tmp_path):
    from amdflow.errors import AmdflowError
    from amdflow.relax.vasp import parse_vasp_dir

    with pytest.raises(AmdflowError, match=r"no vasprun\.xml"):
        parse_vasp_dir(tmp_path)
    (tmp_path / "vasprun.xml").write_text('<?xml version="1.0"?>\n<modeling><generator>')
    with pytest.raises(AmdflowError, match="cannot be parsed"):
        parse_vasp_dir(tmp_path)


def test_corrections_are_read_from_custodian_json():
    from amdflow.relax.vasp.parse import read_corrections

    out = shared_path("vasp", "runs", "al_nscf_uniform", "outputs")
    with gzip.open(out / "custodian.json.gz", "rt") as fh:
        import json

        runs = json.load(fh)
    expected = sum(len(r.get("corrections", [])) for r in runs)
    assert len(read_corrections(out)) == expected


def test_frozen_job_fires_only_when_the_output_is_stale(tmp_path, monkeypatch):
    import os
    import time

    from custodian.vasp.handlers import FrozenJobErrorHandler

    work = tmp_path / "frozen"
    shutil.copytree(shared_path("vasp", "errors", "frozen_job"), work)
    monkeypatch.chdir(work)
    handler = FrozenJobErrorHandler(timeout=3600)
    os.utime("vasp.out", None)  # copytree kept the file's old time: make the output fresh
    assert not handler.check()  # fresh output: the job is alive
    os.utime("vasp.out", (time.time() - 7200, time.time() - 7200))
    assert handler.check()
    before = (work / "INCAR").read_text()
    result = handler.correct()
    assert result["errors"] == ["Frozen job"] and (work / "INCAR").read_text() != before


def test_fake_vasp_checks_inputs_and_writes_parseable_outputs(tmp_path, monkeypatch):
    """The fake refuses POTCARs that do not match POSCAR (as VASP does) and otherwise writes what pymatgen reads."""
    import subprocess
    import sys

    from pymatgen.io.vasp.outputs import Oszicar, Outcar, Vasprun

    from amdflow.relax.vasp import write_inputs

    monkeypatch.delenv("AMDFLOW_FAKE_VASP_ERROR", raising=False)
    run = tmp_path / "run"
    write_inputs(_fein3(), VaspConfig(), run, potcar_spec=True)
    spec = (run / "POTCAR.spec").read_text().split()
    (run / "POTCAR.spec").write_text("\n".join(reversed(spec)) + "\n")
    bad = subprocess.run([sys.executable, "-m", "amdflow.testing.fake_vasp"], cwd=run, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "does not match the POTCAR" in bad.stdout
    (run / "POTCAR.spec").write_text("\n".join(spec) + "\n")
    ok = subprocess.run([sys.executable, "-m", "amdflow.testing.fake_vasp"], cwd=run, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    vr = Vasprun(str(run / "vasprun.xml"), parse_potcar_file=False)
    assert vr.converged and vr.run_type == "GGA" and len(vr.ionic_steps) > 1  # a relaxation towards the model's volume
    assert vr.final_structure.volume != _fein3().volume and vr.eigenvalue_band_properties[0] == 0.0  # FeIn3: a metal
    assert Outcar(str(run / "OUTCAR")).run_stats["Elapsed time (sec)"] > 0
    assert Oszicar(str(run / "OSZICAR")).final_energy == pytest.approx(vr.final_energy)


def test_fake_vasp_error_messages_are_the_ones_custodian_looks_for(monkeypatch):
    from custodian.vasp.handlers import VaspErrorHandler

    from amdflow.testing.fake_vasp import _error_text

    monkeypatch.delenv("AMDFLOW_FAKE_VASP_ERRORS_DIR", raising=False)
    for name in ("zbrent", "subspacematrix", "too_few_bands", "brmix"):
        assert all(m in _error_text(name) for m in VaspErrorHandler.error_msgs[name])


@pytest.mark.parametrize("policy", ["gzip", "keep", "remove_large"])
def test_output_policies(tmp_path, policy):
    from amdflow.relax.vasp.engine import finish_outputs

    for name in ("vasprun.xml.static", "OUTCAR.static", "WAVECAR", "CHGCAR.static", "custodian.json"):
        (tmp_path / name).write_text("x" * 100)
    finish_outputs(tmp_path, policy)
    names = sorted(p.name for p in tmp_path.iterdir())
    if policy == "keep":
        assert names == sorted(["vasprun.xml.static", "OUTCAR.static", "WAVECAR", "CHGCAR.static", "custodian.json"])
    elif policy == "gzip":
        assert names == sorted(["vasprun.xml.static.gz", "OUTCAR.static.gz", "WAVECAR.gz", "CHGCAR.static.gz", "custodian.json.gz"])
    else:  # the large volumetric files go, the rest is gzipped and still parseable (the parser reads .gz)
        assert names == sorted(["vasprun.xml.static.gz", "OUTCAR.static.gz", "custodian.json.gz"])
        with gzip.open(tmp_path / "OUTCAR.static.gz", "rt") as fh:
            assert fh.read() == "x" * 100


def test_ionic_step_labels_match_ases_reading_of_the_same_vasprun():
    """The fine-tuning labels of a real VASP run (first and last ionic steps): energies, forces, and the stress in ASE's
    convention, checked against ASE's own reader of the file (an independent unit and sign conversion)."""
    import ase.io
    import numpy as np

    from amdflow.relax.vasp import parse_vasp_dir

    out = shared_path("vasp", "runs", "feo_ggau_relax", "outputs")
    doc = parse_vasp_dir(out)
    labels = doc["labels"]
    assert len(labels) == 2
    frames = ase.io.read(str(out / doc["final_run"]), index=":", format="vasp-xml")
    assert len(frames) == doc["n_ionic_steps"] == 28
    for label, atoms in zip(labels, (frames[0], frames[-1]), strict=True):
        assert label["energy"] == pytest.approx(atoms.get_potential_energy(force_consistent=False), abs=1e-5)
        assert np.allclose(label["forces"], atoms.get_forces(), atol=1e-5)
        ase_stress = atoms.get_stress(voigt=False)
        assert np.allclose(label["stress"], ase_stress, atol=1e-7), (label["stress"], ase_stress)
    assert labels[-1]["energy"] == pytest.approx(doc["energy"], abs=1e-6)
