"""MongoDB authentication and TLS against the wire server, and no credentials anywhere they could leak.

The server (secantusdb, SCRAM-SHA-256 + TLS) is started on a file-backed store, a user is
created, and it is restarted with ``--auth`` and a self-signed certificate, as a MongoDB
would be configured for a cluster campaign.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import _free_port

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")]

PASSWORD = "s3cret-Pa55"
BIN = Path(sys.executable).parent


def _start(port: int, storage: Path, *extra: str, log: Path) -> subprocess.Popen:
    import pymongo

    proc = subprocess.Popen([sys.executable, "-m", "amdflow.testing.wire_server", "--host", "127.0.0.1", "--port", str(port),
                             "--storage-path", str(storage), *extra], stdout=log.open("a"), stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:  # the handshake answers before authentication, plain or TLS
            kw = {"tls": True, "tlsAllowInvalidCertificates": True} if "--tls-cert-file" in extra else {}
            pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=300, **kw).admin.command("ping")
            return proc
        except pymongo.errors.PyMongoError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"wire server did not start: {log.read_text()[-500:]}")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """(port, CA file) of a server that requires SCRAM auth (user alice) and TLS."""
    import pymongo

    root = tmp_path_factory.mktemp("secured")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(root / "key.pem"), "-out",
                    str(root / "cert.pem"), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    port = _free_port()
    log = root / "server.log"
    proc = _start(port, root / "data", log=log)
    pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/").admin.command(
        "createUser", "alice", pwd=PASSWORD, roles=[{"role": "root", "db": "admin"}])
    proc.terminate()
    proc.wait(30)
    proc = _start(port, root / "data", "--auth", "--tls-cert-file", str(root / "cert.pem"), "--tls-key-file", str(root / "key.pem"), log=log)
    yield port, root / "cert.pem"
    proc.terminate()
    proc.wait(30)


def _lp_file(path: Path, port: int, ca: Path | None, password: str | None = PASSWORD, uri: bool = False) -> Path:
    kwargs: dict = {"serverSelectionTimeoutMS": 3000}
    if ca is not None:
        kwargs.update(tls=True, tlsCAFile=str(ca))
    spec: dict = {"name": "amdflow_secure", "mongoclient_kwargs": kwargs, "strm_lvl": "ERROR"}
    if uri:
        spec["host"] = f"mongodb://alice:{password}@127.0.0.1:{port}/amdflow_secure?authSource=admin"
        spec["uri_mode"] = True
    else:
        spec.update(host="127.0.0.1", port=port, authsource="admin")
        if password is not None:
            spec.update(username="alice", password=password)
    path.write_text(yaml.safe_dump(spec))
    return path


def _amdflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amdflow", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "AMDFLOW_PROGRESS": "false"})


def test_auth_and_tls_against_the_wire_server(secured, tmp_path, caplog):
    """Through the CLI: the good file works (and a readable one is warned about), a wrong password is one line
    without a traceback or a secret. The other files in process (each CLI start-up costs seconds on a loaded
    runner): the same messages, no secret in them."""
    import logging

    from amdflow.db import _mongo_launchpad
    from amdflow.errors import AmdflowError

    port, ca = secured
    good = _lp_file(tmp_path / "good.yaml", port, ca)
    good.chmod(0o644)
    ok = _amdflow("hull", "--launchpad", str(good), cwd=tmp_path)
    assert ok.returncode == 0 and "0 hull system(s) rebuilt" in ok.stderr, ok.stderr
    assert "readable by other users: chmod 600" in " ".join(ok.stderr.split())
    wrong = _lp_file(tmp_path / "wrong.yaml", port, ca, password="not-the-password")
    proc = _amdflow("hull", "--launchpad", str(wrong), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "refused access" in " ".join(out.split()), out
    assert "Traceback" not in out and "not-the-password" not in out and PASSWORD not in out

    with caplog.at_level(logging.WARNING, logger="amdflow.db"):
        _mongo_launchpad(good, "ERROR")
        assert "chmod 600" in caplog.text  # still 0644: the same warning in process
        caplog.clear()
        good.chmod(0o600)
        _mongo_launchpad(good, "ERROR").db.list_collection_names()
    assert "chmod 600" not in caplog.text
    uri = _lp_file(tmp_path / "uri.yaml", port, ca, uri=True)
    uri.chmod(0o600)
    _mongo_launchpad(uri, "ERROR").db.list_collection_names()
    cases = [
        (_lp_file(tmp_path / "wrong-uri.yaml", port, ca, password="not-the-password", uri=True), "refused access", "not-the-password"),
        (_lp_file(tmp_path / "anon.yaml", port, ca, password=None), "refused access", PASSWORD),
        (_lp_file(tmp_path / "notls.yaml", port, None), "cannot reach MongoDB", PASSWORD),
    ]
    for lp_file, message, secret in cases:
        with pytest.raises(AmdflowError) as err:
            _mongo_launchpad(lp_file, "ERROR")
        text = str(err.value)
        assert message in text and "\n" not in text, (lp_file.name, text)
        assert secret not in text and PASSWORD not in text, (lp_file.name, text)

def test_an_unreachable_server_is_reported_after_the_configured_timeout_not_pymongos_30_s(secured, tmp_path):
    """In process (a subprocess's start-up on a loaded runner made a wall-clock bound flaky): the file's
    serverSelectionTimeoutMS reaches the client, our 5 s default where the file sets none, and a TLS server
    spoken to in plain text is reported well before pymongo's default 30 s."""
    from amdflow.db import MONGO_TIMEOUT_MS, _mongo_launchpad
    from amdflow.errors import AmdflowError

    port, ca = secured
    good = _lp_file(tmp_path / "good.yaml", port, ca)
    good.chmod(0o600)
    assert _mongo_launchpad(good, "ERROR").connection.options.server_selection_timeout == 3.0
    spec = yaml.safe_load(good.read_text())
    del spec["mongoclient_kwargs"]["serverSelectionTimeoutMS"]
    default = tmp_path / "default.yaml"
    default.write_text(yaml.safe_dump(spec))
    default.chmod(0o600)
    assert _mongo_launchpad(default, "ERROR").connection.options.server_selection_timeout == MONGO_TIMEOUT_MS / 1000
    notls = _lp_file(tmp_path / "notls.yaml", port, None)
    notls.chmod(0o600)
    start = time.perf_counter()
    with pytest.raises(AmdflowError, match="cannot reach MongoDB"):
        _mongo_launchpad(notls, "ERROR")
    assert time.perf_counter() - start < 15  # 3 s configured; pymongo's own default would be 30 s


def test_no_credentials_in_documents_logs_or_launch_folders(secured, tmp_path):
    """Run a Firework through rlaunch on the authenticated server: the password appears in no
    document of any collection, no log and no file in the launch folder."""
    import pymongo
    from fireworks import Firework, LaunchPad, ScriptTask

    port, ca = secured
    lp_file = _lp_file(tmp_path / "my_launchpad.yaml", port, ca)
    lp = LaunchPad.from_file(str(lp_file))
    lp.reset(password=None, require_password=False)
    lp.add_wf(Firework(ScriptTask.from_str("echo hello"), name="probe"))
    (tmp_path / "launches").mkdir()
    proc = subprocess.run([str(BIN / "rlaunch"), "-l", str(lp_file), "singleshot"], cwd=tmp_path / "launches",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert lp.fireworks.find_one({"name": "probe"})["state"] == "COMPLETED", proc.stdout[-2000:]
    status = _amdflow("hull", "--launchpad", str(lp_file), cwd=tmp_path)
    assert PASSWORD not in proc.stdout + proc.stderr + status.stdout + status.stderr
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", username="alice", password=PASSWORD, authSource="admin",
                                 tls=True, tlsCAFile=str(ca))
    for name in client.list_database_names():
        for coll in client[name].list_collection_names():
            for doc in client[name][coll].find():
                assert PASSWORD not in str(doc), (name, coll)
    for path in (tmp_path / "launches").rglob("*"):
        if path.is_file():
            assert PASSWORD not in path.read_text(errors="ignore"), path


def test_a_read_only_user_reads_results_and_is_refused_writes_in_one_line(secured, tmp_path, binary_campaign_dict):
    """docs/hpc.md's laptop reader: a user with only the `read` role opens the campaign by name, shows and exports
    it; `amdflow add` is refused by the server (its RBAC) in one line naming the role it needs, and writes nothing."""
    import json
    import os

    import pymongo

    import amdflow
    from tests.conftest import campaign_on_server

    port, ca = secured
    db_name = "amdflow_reader_test"
    writer = _lp_file(tmp_path / "writer.yaml", port, ca)
    spec = yaml.safe_load(writer.read_text())
    writer.write_text(yaml.safe_dump({**spec, "name": db_name}))
    writer.chmod(0o600)
    admin = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", username="alice", password=PASSWORD, authSource="admin",
                                tls=True, tlsCAFile=str(ca))
    admin.admin.command("createUser", "reader", pwd="r3ad-0nly", roles=[{"role": "read", "db": db_name}])
    reader = tmp_path / "reader.yaml"
    reader.write_text(yaml.safe_dump({**spec, "name": db_name, "username": "reader", "password": "r3ad-0nly"}))
    reader.chmod(0o600)
    _, cli = campaign_on_server(tmp_path, writer, binary_campaign_dict)
    cli("add", "campaign.yaml")
    counts = {c: admin[db_name][c].count_documents({}) for c in ("candidates", "fireworks", "workflows")}

    with amdflow.open_campaign(binary_campaign_dict["name"], launchpad=reader) as camp:
        cands = camp.candidates()
        assert len(cands) == counts["candidates"] == 6 and camp.thermo().empty  # nothing analysed yet
    env = {**os.environ, "AMDFLOW_LAUNCHPAD_FILE": str(reader), "AMDFLOW_PROGRESS": "false"}

    def as_reader(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "amdflow", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    shown = as_reader("show", "campaign.yaml", cands["candidate_id"].iloc[0][:8], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["candidate_id"] == cands["candidate_id"].iloc[0], shown.stderr
    exported = as_reader("export", "campaign.yaml", "--what", "candidates", "--format", "csv", "--out", str(tmp_path / "c.csv"))
    assert exported.returncode == 0 and len((tmp_path / "c.csv").read_text().splitlines()) == 7, exported.stderr
    status = as_reader("status", "campaign.yaml", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["candidates_total"] == 6, status.stderr
    refused = as_reader("add", "campaign.yaml")
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "refused `amdflow add` to this user" in err and "readWrite role" in err and "r3ad-0nly" not in err, err
    assert {c: admin[db_name][c].count_documents({}) for c in counts} == counts
    admin.drop_database(db_name)
