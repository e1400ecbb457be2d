"""The embedded store's snapshot + journal: what is on disk after each flush is the live store, a kill loses only
unflushed writes, a torn append is dropped, and a flush's cost is what changed, not the store."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import gridfs
import pytest

from amdflow.db import open_db
from amdflow.embedded import JOURNAL_FILE, STORE_FILE, EmbeddedStore
from amdflow.settings import get_settings


def _ms(value):
    """BSON keeps datetimes to the millisecond (MongoDB too): compare at that precision."""
    if isinstance(value, datetime.datetime):
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, dict):
        return {k: _ms(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ms(v) for v in value]
    return value


def _dump(server_store) -> dict:
    """Every document of every collection, by (db, collection), in store order (the meta database left out)."""
    return {(d, c): [_ms(doc) for doc in cs._documents.values()]
            for d, ds in server_store._databases.items() if d != "amdflow_store_meta"
            for c, cs in ds._collections.items() if cs._documents}


def _reopen_copy(folder, tmp_path, name="copy"):
    """What a process started now would load: the folder's files as they lie on disk (no close, no flush)."""
    copy = tmp_path / name
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for f in (STORE_FILE, JOURNAL_FILE):
        if (folder / f).exists():
            shutil.copy(folder / f, copy / f)
    store = EmbeddedStore(copy)
    store.open()
    return store


def test_journal_replays_every_kind_of_write(tmp_path):
    folder = tmp_path / "camp"
    with open_db(folder, get_settings()) as db:
        lp, cands = db.launchpad, db.candidates
        cands.insert_many([{"candidate_id": f"c{i}", "campaign": "x", "n": i, "tags": []} for i in range(50)])
        db.flush()  # mostly new: a snapshot
        snapshots = db.embedded.stats["snapshots"]
        # every write path FireWorks and amdflow use, between flushes
        cands.insert_one({"candidate_id": "new", "campaign": "x", "n": -1})
        cands.update_one({"candidate_id": "c1"}, {"$set": {"state": "screened", "prediction.e": -0.5}, "$inc": {"n": 10}})
        cands.update_many({"n": {"$lt": 5}}, {"$push": {"tags": "low"}})
        cands.replace_one({"candidate_id": "c7"}, {"candidate_id": "c7", "campaign": "x", "replaced": True})
        cands.find_one_and_update({"candidate_id": "c8"}, {"$unset": {"tags": ""}, "$currentDate": {"at": True}})
        cands.update_one({"candidate_id": "upserted"}, {"$setOnInsert": {"n": 99}}, upsert=True)
        cands.update_one({"candidate_id": "c9"}, [{"$set": {"n2": {"$multiply": ["$n", 2]}}}])  # a pipeline update
        cands.delete_one({"candidate_id": "c2"})
        cands.delete_many({"n": {"$gte": 40, "$lt": 45}})
        cands.find_one_and_delete({"candidate_id": "c3"})
        gridfs.GridFS(lp.db).put(b"x" * 1000, filename="blob")
        lp.fireworks.insert_one({"fw_id": 1, "state": "READY", "spec": {"campaign": "x"}})
        lp.fireworks.find_one_and_update({"fw_id": 1}, {"$set": {"state": "RUNNING"}})
        db.flush()
        assert db.embedded.stats["snapshots"] == snapshots, "a few writes go to the journal, not a new snapshot"
        assert (folder / JOURNAL_FILE).stat().st_size > 0
        live = _dump(db.embedded.server_store)
        copy = _reopen_copy(folder, tmp_path)
        try:
            assert copy.stats["replayed_docs"] > 0
            assert _dump(copy.server_store) == live
        finally:
            copy.close(flush=False)
        # unflushed writes are what a kill loses, and nothing else
        cands.update_one({"candidate_id": "c4"}, {"$set": {"state": "lost"}})
        copy = _reopen_copy(folder, tmp_path)
        try:
            assert _dump(copy.server_store) == live
        finally:
            copy.close(flush=False)
    # a clean close leaves one complete snapshot (what `lpad` reads) and no journal
    assert not (folder / JOURNAL_FILE).exists()
    with open_db(folder, get_settings()) as db:
        assert db.candidates.find_one({"candidate_id": "c4"})["state"] == "lost"
        assert db.candidates.find_one({"candidate_id": "c1"})["n"] == 11
        assert db.candidates.count_documents({}) == 50 + 2 - 1 - 5 - 1


def test_torn_append_is_dropped_and_a_stale_journal_ignored(tmp_path):
    folder = tmp_path / "camp"
    with open_db(folder, get_settings()) as db:
        db.candidates.insert_many([{"candidate_id": f"c{i}", "n": i} for i in range(20)])
        db.flush()
        db.candidates.update_one({"candidate_id": "c1"}, {"$set": {"n": 100}})
        db.flush()
        committed = _dump(db.embedded.server_store)
        db.candidates.update_one({"candidate_id": "c2"}, {"$set": {"n": 200}})
        db.flush()
        journal = (folder / JOURNAL_FILE).read_bytes()
        # a kill in the middle of the last append: its commit line, and part of its entry, never reached the disk
        (folder / JOURNAL_FILE).write_bytes(journal[: len(journal) - 30])
        copy = _reopen_copy(folder, tmp_path)
        try:
            assert _dump(copy.server_store) == committed
            assert copy.stats["dropped_torn_bytes"] > 0
            assert (tmp_path / "copy" / JOURNAL_FILE).stat().st_size < len(journal) - 30, "the torn tail is cut off"
        finally:
            copy.close(flush=False)
        (folder / JOURNAL_FILE).write_bytes(journal)
        # a new snapshot (e.g. the journal outgrew it); a kill before the journal is removed leaves the old journal
        db.embedded.snapshot()
        (folder / JOURNAL_FILE).write_bytes(journal.replace(b'"n": 200', b'"n": 999'))
        copy = _reopen_copy(folder, tmp_path, "copy2")
        try:
            assert copy.stats["replayed_docs"] == 0, "a journal naming an older snapshot is never replayed"
            assert copy.server_store["amdflow"]["candidates"]  # loaded from the snapshot
            assert next(d for d in copy.server_store["amdflow"]["candidates"]._documents.values()
                        if d["candidate_id"] == "c2")["n"] == 200
        finally:
            copy.close(flush=False)


def test_flush_writes_what_changed_not_the_store(tmp_path):
    folder = tmp_path / "camp"
    with open_db(folder, get_settings()) as db:
        db.candidates.insert_many([{"candidate_id": f"c{i}", "payload": "x" * 8000} for i in range(500)])  # ~4 MB
        db.flush()
        store_bytes = (folder / STORE_FILE).stat().st_size
        assert store_bytes > 4_000_000
        snapshots, mtime = db.embedded.stats["snapshots"], (folder / STORE_FILE).stat().st_mtime_ns
        for i in range(100):  # 100 "Fireworks", one document each
            db.candidates.update_one({"candidate_id": f"c{i}"}, {"$set": {"state": "done"}})
            db.flush()
        assert db.embedded.stats["snapshots"] == snapshots and (folder / STORE_FILE).stat().st_mtime_ns == mtime
        journal_bytes = (folder / JOURNAL_FILE).stat().st_size
        assert journal_bytes < 100 * 8500, journal_bytes  # each append holds its one document (~8 kB)
        # once the journal outgrows the snapshot, they are folded into a new snapshot
        for rnd in range(3):
            for i in range(500):
                db.candidates.update_one({"candidate_id": f"c{i}"}, {"$set": {"round": rnd}})
                if i % 200 == 199:
                    db.flush()
        db.flush()
        assert db.embedded.stats["snapshots"] > snapshots
        assert (not (folder / JOURNAL_FILE).exists()) or (folder / JOURNAL_FILE).stat().st_size <= 2 * store_bytes


def test_kill_9_loses_only_the_unflushed_writes(tmp_path):
    """A writer flushes after each of its 'Fireworks' and says so; kill -9 it; every flushed one is there."""
    folder = tmp_path / "camp"
    code = textwrap.dedent(f"""
        import sys
        from amdflow.db import open_db
        from amdflow.settings import get_settings
        with open_db({str(folder)!r}, get_settings()) as db:
            db.candidates.insert_many([{{"candidate_id": f"c{{i}}", "payload": "x" * 500}} for i in range(1000)])
            db.flush()
            i = 0
            while True:
                db.candidates.update_one({{"candidate_id": f"c{{i % 1000}}"}}, {{"$inc": {{"runs": 1}}}})
                db.candidates.insert_one({{"candidate_id": f"w{{i}}"}})
                db.flush()
                print(i, flush=True)
                i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = -1
    deadline = time.time() + 120
    while last < 100 and time.time() < deadline:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        last = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # lines it printed before the kill but this loop had not read yet: each is a flush it finished
    for line in proc.stdout.read().split("\n")[:-1]:  # whole lines only
        last = int(line)
    assert last >= 100
    with open_db(folder, get_settings()) as db:  # the lock died with the process
        n = db.candidates.count_documents({"candidate_id": {"$regex": "^w"}})
        # every flush it reported is on disk; at most the one after it, in flight, is lost or kept
        assert last + 1 <= n <= last + 2
        assert sum(d.get("runs", 0) for d in db.candidates.find({"runs": {"$exists": True}})) == n


def test_after_close_a_plain_launchpad_talks_to_mongodb_not_to_a_mock(tmp_path):
    """FireWorks first imported while an embedded store is open (its mongomock mode is set at import) is pymongo's again
    after the store closes: a LaunchPad of a MongoDB server made later in the process reaches the server (no mock)."""
    code = textwrap.dedent(f"""
        import sys
        assert "fireworks" not in sys.modules
        from amdflow.db import open_db
        from amdflow.settings import get_settings
        with open_db({str(tmp_path / "camp")!r}, get_settings()) as db:
            db.candidates.insert_one({{"candidate_id": "c1"}})
        import mongomock, pymongo
        import fireworks.core.launchpad as fw_lp
        import fireworks.fw_config as fw_config
        assert fw_lp.MongoClient is pymongo.MongoClient and fw_config.MongoClient is pymongo.MongoClient
        from fireworks import LaunchPad
        lp = LaunchPad(host="127.0.0.1", port=9, name="nowhere", mongoclient_kwargs={{"serverSelectionTimeoutMS": 200}})
        assert isinstance(lp.connection, pymongo.MongoClient) and not isinstance(lp.connection, mongomock.MongoClient)
        try:
            lp.connection.admin.command("ping")
        except pymongo.errors.ServerSelectionTimeoutError:
            print("reached for a server")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MONGOMOCK_SERVERSTORE_FILE", "AMDFLOW_LAUNCHPAD_FILE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "reached for a server" in proc.stdout, proc.stderr[-2000:]


def test_unique_indexes_hold_through_inserts_updates_and_rollbacks(tmp_path):
    """The fast unique-key check (counts kept across a run of inserts) refuses exactly what mongomock's own scan does."""
    from pymongo.errors import BulkWriteError, DuplicateKeyError

    with open_db(tmp_path / "camp", get_settings()) as db:
        c = db.candidates  # unique index on candidate_id
        c.insert_many([{"candidate_id": f"c{i}"} for i in range(100)])
        with pytest.raises(DuplicateKeyError):
            c.insert_one({"candidate_id": "c5"})
        c.insert_one({"candidate_id": "c100"})  # after a rolled-back insert, the counts are right again
        with pytest.raises(BulkWriteError):
            c.insert_many([{"candidate_id": "n1"}, {"candidate_id": "n1"}])
        assert c.count_documents({"candidate_id": "n1"}) == 1
        with pytest.raises(DuplicateKeyError):  # an update that would duplicate a key is rolled back
            c.update_one({"candidate_id": "c1"}, {"$set": {"candidate_id": "c2"}})
        assert c.count_documents({"candidate_id": "c1"}) == 1
        c.update_one({"candidate_id": "c3"}, {"$set": {"candidate_id": "renamed"}})
        c.insert_one({"candidate_id": "c3"})  # its old key is free now
        with pytest.raises(DuplicateKeyError):
            c.insert_one({"candidate_id": "renamed"})
        c.delete_one({"candidate_id": "c7"})
        c.insert_one({"candidate_id": "c7"})
        with pytest.raises(DuplicateKeyError):
            c.insert_one({"candidate_id": "c7"})
        c.insert_one({"other": 1})  # no candidate_id: key None, once
        with pytest.raises(DuplicateKeyError):
            c.insert_one({"other": 2})
        assert c.count_documents({}) == 100 + 1 + 1 + 1 + 1


def test_lookup_maps_answer_exactly_what_a_scan_answers():
    """Random documents (arrays, sub-documents, missing fields, None, mixed types) and random writes: every query through
    the patched mongomock returns what testing every document returns, in the same order."""
    import random

    import mongomock
    from mongomock.filtering import filter_applies

    rng = random.Random(int(os.environ.get("AMDFLOW_TEST_SEED", "7")))
    coll = mongomock.MongoClient().db.things
    coll.create_index("uid", unique=True)

    def value():
        return rng.choice([1, 2, 3, 2.0, 0, "a", "b", None, True, False, [1, 2], ["a"], {"x": 1}, "c"])

    def doc(i):
        d = {"uid": i, "k": value(), "s": rng.choice(["x", "y", "z"]), "n": {"m": value()},
             "arr": rng.sample([1, 2, 3, "a", "b", 2.0, True, 0], rng.randrange(4)),  # a multikey field
             "flag": rng.choice([True, False, 1, 0, 1.0])}  # MongoDB: true != 1
        if rng.random() < 0.2:
            del d["k"]
        return d

    coll.insert_many([doc(i) for i in range(300)])
    uid = 300
    for step in range(400):
        field = rng.choice(["k", "s", "n.m", "uid", "arr", "flag"])
        v = value()
        q = rng.choice([{field: v} if not isinstance(v, (list, dict)) else {field: 1},
                        {field: {"$in": [value(), value()]}} if field != "uid" else {field: {"$in": [rng.randrange(320), 5]}},
                        {"s": rng.choice("xyz"), field: v if not isinstance(v, (list, dict)) else 2}])
        store = coll._store
        expected = [d["uid"] for d in list(store._documents.values()) if filter_applies(q, d)]
        assert [d["uid"] for d in coll.find(q)] == expected, q
        assert coll.count_documents(q) == len(expected), q
        if step % 3 == 0:
            coll.update_many({"s": rng.choice("xyz")}, {"$set": {"k": value()}})
        elif step % 3 == 1:
            coll.delete_one({"uid": rng.randrange(uid)})
            coll.insert_one(doc(uid))
            uid += 1
        else:
            coll.update_one({"uid": rng.randrange(uid)}, {"$set": {"n.m": value(), "s": rng.choice("xyz")},
                                                          "$push": {"arr": rng.choice([1, 3, "b"])}})
        if step % 50 == 0:  # an aggregation that starts with $match, against mongomock's own on every document
            import copy

            from mongomock import aggregate

            pipeline = [{"$match": {"s": "x"}}, {"$group": {"_id": "$k", "c": {"$sum": 1}}}]
            brute = aggregate.process_pipeline([copy.deepcopy(d) for d in store._documents.values()], coll.database,
                                               pipeline, None)
            assert sorted(map(repr, coll.aggregate(pipeline))) == sorted(map(repr, brute))
    maps = coll._store.__dict__["_amdflow"]["maps"]
    assert {"uid", "s", "arr", "flag"} <= set(maps), "the queries above went through the lookup maps"
    assert {"k", "n.m"} <= coll._store.__dict__["_amdflow"]["unsafe"], "fields holding sub-documents are left to the scan"


def test_cursors_page_like_mongomock():
    """The cursor patch hands out what mongomock's own cursor does: skip, limit, sort, rewind, an emptied result."""
    import mongomock

    coll = mongomock.MongoClient().db.c
    coll.insert_many([{"i": i, "g": i % 3} for i in range(50)])
    assert [d["i"] for d in coll.find({"g": 1})] == list(range(1, 50, 3))
    assert [d["i"] for d in coll.find().skip(5).limit(3)] == [5, 6, 7]
    assert [d["i"] for d in coll.find().sort("i", -1).limit(4)] == [49, 48, 47, 46]
    cur = coll.find({"g": 2})
    first = next(cur)["i"]
    cur.rewind()
    assert next(cur)["i"] == first == 2
    assert list(coll.find({"g": 7})) == []
    cur = coll.find({"g": 0}).sort("i", -1)
    assert [d["i"] for d in cur][:2] == [48, 45]
