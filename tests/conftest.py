"""Fixtures. Tier 2 of the database plan: one shared mongomock store in this process.

``fireworks.core.launchpad.MongoClient`` is patched to return clients on one shared
``mongomock`` ServerStore, so every LaunchPad of the test (and ``rapidfire``) sees one
consistent database. Tests that need ``../shared`` data skip when it is absent.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
os.environ.pop("MONGOMOCK_SERVERSTORE_FILE", None)
os.environ.setdefault("AMDFLOW_CONFIG_FILE", "")  # never read a developer's ~/.amdflow.yaml
# One OpenMP/torch thread per process (inherited by every rocket and CLI the tests start): pytest -n 2 already
# fills the cores, and tests that run 2-4 rockets at once oversubscribed them with 2 threads each (measured: six
# kill -9 tests took 290 s with torch's default threads, 159 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# mongomock as the embedded store patches it (lookup maps, write tracking: amdflow.mongomock_patches), in every test
# process from the start, so that the tier-2 store behaves the same whichever test first opened an embedded store
from amdflow.mongomock_patches import install as _install_mongomock_patches  # noqa: E402

_install_mongomock_patches()

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AMDFLOW_SHARED_DIR", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/{'/'.join(parts)} (reference data, present in CI, absent in a fresh clone)")
    return path


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("AMDFLOW_") and key != "AMDFLOW_SHARED_DIR":
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AMDFLOW_CONFIG_FILE", str(tmp_path / "no-settings.yaml"))
    monkeypatch.delenv("AMDFLOW_CONFIG_FILE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def lpad(monkeypatch: pytest.MonkeyPatch):
    """A LaunchPad on a fresh shared in-process mongomock store."""
    import fireworks.core.launchpad as fw_launchpad
    import mongomock
    import mongomock.gridfs
    from mongomock.store import ServerStore

    mongomock.gridfs.enable_gridfs_integration()
    store = ServerStore.__new__(ServerStore)
    store._databases = {}
    monkeypatch.setattr(fw_launchpad, "MongoClient", lambda *a, **k: mongomock.MongoClient(_store=store))
    # mongomock is not thread-safe (an update clears and refills the stored document in place), so the Rocket's ping
    # thread, racing rapidfire's next check-out, found no launch ("No Launch exists with launch_id=N"): in-process,
    # the store has no other process to guard against; amdflow.ops.run_campaign does the same on the embedded store
    import fireworks.core.rocket as fw_rocket

    from amdflow.ops import _no_ping_thread

    monkeypatch.setattr(fw_rocket, "start_ping_launch", _no_ping_thread)
    lp = fw_launchpad.LaunchPad(host="localhost", name="amdflow_test", strm_lvl="ERROR")
    lp.reset(password=None, require_password=False)
    return lp


@pytest.fixture
def db(lpad):
    from amdflow.db import AmdflowDB

    adb = AmdflowDB(lpad)
    adb.ensure_indexes()
    return adb


@pytest.fixture
def binary_campaign_dict(tmp_path: Path) -> dict:
    """A tiny Al-Ni campaign: B2 and L1_2 templates x 2 lattice scales (6 candidates), fcc references only, no funnel."""
    return {
        "name": "AlNi-test",
        "elements": ["Ni", "Al"],
        "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c"]}],
        "generate": {"lattice_scales": [1.0, 1.03]},  # scaled copies: dedup has work to do
        "screen": {"max_formation_energy_per_atom": 0.5},
        "funnel": {"engine": "none"},  # these tests are about the other stages; tests/test_funnel.py turns it on
        # one fcc reference per element (Al's and Ni's ground state is fcc): the counts these tests check; the default
        # references are tested in tests/test_energies.py and the minimal campaign of tests/test_cli.py
        "relax": {"fmax": 0.1, "max_steps": 100, "reference_prototypes": ["fcc"], "reference_ground_state": False},
        "analyze": {"promising_e_above_hull": 0.1},
        "output_dir": str(tmp_path / "out"),
    }


# ---------------------------------------------------------------- tier 3: a wire server
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory):
    """A MongoDB URI: AMDFLOW_TEST_MONGO_URI if set, else the patched wire server on a free loopback port."""
    import subprocess
    import sys
    import time

    import pymongo

    uri = os.environ.get("AMDFLOW_TEST_MONGO_URI")
    if uri:
        yield uri
        return
    port = _free_port()
    log = open(tmp_path_factory.mktemp("wire") / "server.log", "w")  # noqa: SIM115 - closed below
    # test commands on: configureFailPoint, for the tests that make one command of one client fail (by appName)
    proc = subprocess.Popen([sys.executable, "-m", "amdflow.testing.wire_server", "--host", "127.0.0.1", "--port", str(port),
                             "--enable-test-commands"], stdout=log, stderr=subprocess.STDOUT)
    uri = f"mongodb://127.0.0.1:{port}/"
    deadline = time.time() + 30
    while True:
        try:
            pymongo.MongoClient(uri, serverSelectionTimeoutMS=500).admin.command("ping")
            break
        except pymongo.errors.PyMongoError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the wire server did not start; see {log.name}")
            time.sleep(0.2)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def mongo_launchpad_file(mongo_uri, tmp_path):
    """A LaunchPad YAML on a fresh database of the test server; the database is dropped after."""
    import uuid

    import pymongo
    import yaml

    name = f"amdflow_test_{uuid.uuid4().hex[:10]}"
    path = tmp_path / "my_launchpad.yaml"
    path.write_text(yaml.safe_dump({"host": mongo_uri, "name": name, "logdir": None, "strm_lvl": "WARNING",
                                    "mongoclient_kwargs": {"serverSelectionTimeoutMS": 5000}}))
    yield path
    pymongo.MongoClient(mongo_uri).drop_database(name)


# ---------------------------------------------------------------- fault figures
_FIGURES_FILE = os.environ.get("AMDFLOW_FAULT_FIGURES")  # read at import: the autouse fixture clears AMDFLOW_* for each test
def fault_figures(lp, db) -> dict[str, int]:
    """Results lost and duplicated, counted from the documents."""
    states = {fw["fw_id"]: fw["state"] for fw in lp.fireworks.find({}, {"fw_id": 1, "state": 1})}
    completed: dict[int, int] = {}
    for launch in lp.launches.find({"state": "COMPLETED"}, {"fw_id": 1}):
        completed[launch["fw_id"]] = completed.get(launch["fw_id"], 0) + 1
    # one task document per completed relaxation: references, known phases, the funnel's, and the final ones
    # (a relax Firework the funnel's check stopped completes without relaxing: it has no task)
    relaxations = lp.fireworks.count_documents({"spec.amdflow_stage": {"$in": ["reference", "known", "funnel"]}, "state": "COMPLETED"})
    relax_ids = [fw["fw_id"] for fw in lp.fireworks.find({"spec.amdflow_stage": "relax", "state": "COMPLETED"}, {"fw_id": 1})]
    relaxations += lp.launches.count_documents({"fw_id": {"$in": relax_ids}, "state": "COMPLETED", "action.stored_data.task_id": {"$exists": True}})
    unfinished = sum(s not in ("COMPLETED", "DEFUSED") for s in states.values())
    return {
        "fireworks": len(states),
        "unfinished": unfinished,
        "lost": unfinished + abs(relaxations - len(db.tasks.distinct("task_id"))),
        "duplicated": sum(n - 1 for n in completed.values()) + (db.tasks.count_documents({}) - len(db.tasks.distinct("task_id"))),
    }


def record_figures(case: str, figures: dict) -> None:
    """Print a fault test's figures; with AMDFLOW_FAULT_FIGURES=FILE also append them there (`make faults` sums them)."""
    import json

    line = json.dumps({"case": case, **figures})
    print(line)
    if _FIGURES_FILE:
        with open(_FIGURES_FILE, "a") as fh:
            fh.write(line + "\n")


def campaign_on_server(tmp_path: Path, launchpad_file: Path, campaign: dict):
    """Write campaign.yaml (outputs in tmp_path/out) for a MongoDB LaunchPad; return (env, cli).

    ``cli(*args)`` runs `python -m amdflow ARGS` in tmp_path with that env and asserts it succeeded.
    """
    import subprocess
    import sys

    import yaml

    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump({**campaign, "output_dir": str(tmp_path / "out")}))
    env = {**os.environ, "AMDFLOW_LAUNCHPAD_FILE": str(launchpad_file), "AMDFLOW_PROGRESS": "false"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "amdflow", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    return env, cli
