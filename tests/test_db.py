from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from pymongo.errors import DuplicateKeyError

from amdflow.db import STORE_FILE, EmbeddedStore, open_db
from amdflow.errors import AmdflowError, StoreBusyError
from amdflow.settings import get_settings


def test_embedded_store_persists_and_is_locked(tmp_path):
    folder = tmp_path / "camp"
    with open_db(folder, get_settings()) as db:
        db.candidates.insert_one({"candidate_id": "x1", "campaign": "c", "state": "generated"})
        # a second opener (another file description, as another process would have) fails at once
        second = EmbeddedStore(folder)
        start = time.perf_counter()
        with pytest.raises(StoreBusyError, match=r"single-process.*MongoDB"):
            second.open()
        assert time.perf_counter() - start < 1.0
        db.flush()
        assert '"x1"' in (folder / STORE_FILE).read_text()
    with open_db(folder, get_settings()) as db:
        assert db.candidates.find_one({"candidate_id": "x1"})["state"] == "generated"
        assert db.launchpad.fw_id_assigner.count_documents({}) == 1
        with pytest.raises(DuplicateKeyError):  # unique index holds after reload
            db.candidates.insert_one({"candidate_id": "x1"})
    assert (folder / "FW_config.yaml").exists() and (folder / "my_launchpad.yaml").exists()


def test_second_process_fails_with_clear_message(tmp_path):
    folder = tmp_path / "camp"
    code = textwrap.dedent(
        f"""
        import sys
        from amdflow.db import EmbeddedStore
        from amdflow.errors import StoreBusyError
        try:
            EmbeddedStore({str(folder)!r}).open()
        except StoreBusyError as err:
            print(err); sys.exit(3)
        """
    )
    with open_db(folder, get_settings()):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "in use by another amdflow process" in proc.stdout and "AMDFLOW_LAUNCHPAD_FILE" in proc.stdout
    # lock released: a process can open it now
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_corrupt_store_is_reported(tmp_path):
    folder = tmp_path / "camp"
    folder.mkdir()
    (folder / STORE_FILE).write_text("{not json")
    with pytest.raises(AmdflowError, match="unreadable"), open_db(folder, get_settings()):
        pass
    # the lock was released
    store = EmbeddedStore(folder)
    with pytest.raises(AmdflowError, match="unreadable"):
        store.open()


def test_unreachable_mongodb_is_quick_and_clear(tmp_path, monkeypatch):
    lp_file = tmp_path / "my_launchpad.yaml"
    lp_file.write_text("host: 127.0.0.1\nport: 1\nname: amdflow\nusername: secretuser\npassword: hunter2\nmongoclient_kwargs:\n  serverSelectionTimeoutMS: 500\n")
    start = time.perf_counter()
    with pytest.raises(AmdflowError, match="cannot reach MongoDB") as info, open_db(None, get_settings(launchpad_file=lp_file)):
        pass
    assert time.perf_counter() - start < 10
    assert "hunter2" not in str(info.value)


def test_no_database_configured():
    with pytest.raises(AmdflowError, match="no database"), open_db(None, get_settings()):
        pass
