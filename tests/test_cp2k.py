"""The CP2K engine: inputs (spin, fresh start, k-points, basis), and a tiny campaign relaxed with CP2K through Custodian.

The campaign test needs Debian's cp2k (`make test` installs it when it can); without
it the test skips and says so.
"""

from __future__ import annotations

import os
import shutil

import pytest
from pymatgen.core import Lattice, Structure

from amdflow.campaign import Cp2kConfig

CP2K = shutil.which("cp2k.psmp") or shutil.which("cp2k")
DATA = os.path.exists("/usr/share/cp2k/BASIS_MOLOPT") or bool(os.environ.get("CP2K_DATA_DIR"))
needs_cp2k = pytest.mark.skipif(not (CP2K and DATA), reason="needs CP2K (Debian: apt-get install cp2k; `make test` installs it as root)")


def _si() -> Structure:
    return Structure(Lattice([[0, 2.715, 2.715], [2.715, 0, 2.715], [2.715, 2.715, 0]]), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def _inp(structure: Structure, cfg: Cp2kConfig, tmp_path) -> str:
    from amdflow.relax.cp2k import write_inputs

    return (write_inputs(structure, cfg, tmp_path / "run") / "cp2k.inp").read_text()


@pytest.mark.skipif(not DATA, reason="needs CP2K's data files (Debian: apt-get install cp2k)")
def test_inputs_handle_the_three_traps(tmp_path):
    """Spin off unless asked (pymatgen turns it on), a fresh start (no old wavefunction), never Gamma-only."""
    from amdflow.relax.cp2k import kpoint_mesh

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "CP2K-RESTART.wfn").write_text("stale")
    text = _inp(_si(), Cp2kConfig(), tmp_path)
    assert "UKS False" in text and "SCF_GUESS ATOMIC" in text and "EPS_DEFAULT 1e-12" in text
    assert "EPS_DEFAULT 1e-08" in _inp(_si(), Cp2kConfig(eps_default=1e-8), tmp_path)
    assert not list((tmp_path / "run").glob("*.wfn"))
    assert "DZVP-MOLOPT-SR-GTH" in text and "GTH-PBE" in text and "RUN_TYPE CELL_OPT" in text
    fe = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert "UKS True" in _inp(fe, Cp2kConfig(), tmp_path)  # spin: auto turns it on for a magnetic element
    big = Structure(Lattice.cubic(20.0), ["Si"], [[0, 0, 0]])
    assert min(kpoint_mesh(big, 64)) >= 2 and kpoint_mesh(_si(), 64) == kpoint_mesh(_si(), 64)


@pytest.mark.skipif(not DATA, reason="needs CP2K's data files (Debian: apt-get install cp2k)")
def test_candidate_and_reference_share_settings_and_bad_basis_is_clear(tmp_path):
    import re

    from amdflow.errors import AmdflowError

    cfg = Cp2kConfig(cutoff=300)
    sige = Structure(Lattice.cubic(5.6), ["Si", "Ge"] * 4, [[0, 0, 0], [0.25, 0.25, 0.25], [0.5, 0.5, 0], [0.75, 0.75, 0.25],
                                                              [0.5, 0, 0.5], [0.75, 0.25, 0.75], [0, 0.5, 0.5], [0.25, 0.75, 0.75]])

    def settings(text: str) -> dict:
        keys = ("CUTOFF", "REL_CUTOFF", "EPS_SCF", "UKS", "BASIS_SET", "POTENTIAL", "METHOD", "MAX_FORCE")
        return {k: sorted(set(re.findall(rf"^\s*{k} (.+)$", text, re.M))) for k in keys}

    assert settings(_inp(sige, cfg, tmp_path / "a")) == settings(_inp(_si(), cfg, tmp_path / "b"))
    with pytest.raises(AmdflowError, match=r"relax\.cp2k\.basis"):
        _inp(_si(), Cp2kConfig(basis="NO-SUCH-BASIS"), tmp_path / "c")


@needs_cp2k
@pytest.mark.slow
def test_tiny_campaign_relaxed_with_cp2k_through_custodian(db, lpad, tmp_path, monkeypatch):
    """Si-Ge: zinc-blende SiGe and the diamond references, CELL_OPT with CP2K under Custodian, hull built."""
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    from amdflow.campaign import campaign_from_dict
    from amdflow.ops import add_campaign

    cfg = campaign_from_dict({
        "name": "SiGe-cp2k", "elements": ["Si", "Ge"],
        "templates": [{"source": "aflow", "prototypes": ["AB_cF8_216_c_a"]}],
        "screen": {"max_formation_energy_per_atom": 2.0},
        "funnel": {"engine": "none"},  # CP2K alone: the funnel's own tests are in test_funnel.py
        # the diamond prototype at the volume rule's volume, not the shipped ground state (also diamond, at the
        # experimental volume): from there Ge's pressure at these test settings still oscillates after 10 CELL_OPT
        # steps (not converged, so no hull), and 25 steps wander by 1 eV/atom (250 Ry is far from converged)
        "relax": {"engine": "cp2k", "reference_ground_state": False, "reference_prototypes": ["diamond"],
                  # test settings: at 250 Ry the cell gradient of these cells levels off near 0.01 Ha/bohr (stress
                  # noise), so the test converges to 0.015; production uses 400 Ry and CP2K's 4.5e-4. EPS_DEFAULT
                  # 1e-8 (not 1e-12) halves the grid work: Si's CELL_OPT took 39 s instead of 83 s, energy within 1e-6 Ha
                  "cp2k": {"cutoff": 250, "kpoint_density": 10, "max_force": 1.5e-2, "max_iter": 10, "eps_scf": 1e-5,
                           "eps_default": 1e-8}},
        "output_dir": str(tmp_path / "out"),
    })
    report = add_campaign(db, cfg)
    assert report.new_candidates == 1
    monkeypatch.setenv("AMDFLOW_CUSTODIAN_POLL_S", "1")  # Custodian notices each finished CP2K run within a second, not 10
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one CP2K thread: under pytest -n 2 the other core runs the other tests
    cwd = os.getcwd()
    (tmp_path / "launches").mkdir()
    try:
        os.chdir(tmp_path / "launches")
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"], env={"cp2k_cmd": CP2K}), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)
    states = {fw["name"]: fw["state"] for fw in lpad.fireworks.find({}, {"name": 1, "state": 1})}
    assert set(states.values()) == {"COMPLETED"}, states
    tasks = list(db.tasks.find({}))
    assert len(tasks) == 3 and {t["engine"] for t in tasks} == {"cp2k"} and len({t["run_type"] for t in tasks}) == 1
    by_formula = {t["formula"]: t for t in tasks}
    assert set(by_formula) == {"Si", "Ge", "SiGe"}
    assert all(not t["details"]["spin_polarized"] for t in tasks)  # spin off (pymatgen's default would be on)
    # the diamond references converge (pressure and gradients) within 10 CELL_OPT steps at these test settings; the
    # SiGe cell's pressure oscillates at 250 Ry and its task says converged: false (recorded, not hidden)
    assert by_formula["Si"]["converged"] and by_formula["Ge"]["converged"]
    assert by_formula["SiGe"]["n_steps"] >= 1
    # GTH-PBE energies per atom: about -107 eV (Si, 4 valence electrons) and -108 eV (Ge)
    assert -112 < by_formula["Si"]["energy_per_atom"] < -102 and -113 < by_formula["Ge"]["energy_per_atom"] < -103
    thermo = db.thermo.find_one({"formula": "SiGe"})
    assert thermo is not None and abs(thermo["formation_energy_per_atom"]) < 0.5  # SiGe mixes nearly ideally
