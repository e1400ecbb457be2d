"""The wire test server's patches change its speed, never its answers."""

from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("secantus")


def _random_value(rng: random.Random):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randrange(20)
    if kind == 1:
        return float(rng.randrange(20)) + rng.choice([0.0, 0.5])
    if kind == 2:
        return f"s{rng.randrange(20)}"
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return [_random_value(rng) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {"a": rng.randrange(20)}
    if kind == 7:
        from bson.int64 import Int64

        return Int64(rng.randrange(20))
    if kind == 8:
        return [[rng.randrange(20)], rng.randrange(20)]
    if kind == 9:
        from bson.decimal128 import Decimal128

        return Decimal128(str(rng.randrange(20)))
    if kind == 10:
        return float("nan")
    return rng.randrange(20)  # and "missing": the field left out below


def test_in_matcher_patch_gives_the_original_answers():
    from secantus import query

    from amdflow.testing import wire_server

    original = query._op_matches
    rng = random.Random(int(os.environ.get("AMDFLOW_TEST_SEED", "7")))
    docs = []
    for k in range(400):
        doc = {"_id": k}
        if rng.random() < 0.9:
            doc["x"] = _random_value(rng)
        doc["y"] = {"z": _random_value(rng)}
        docs.append(doc)
    filters = []
    for _ in range(60):
        arg = [rng.choice([rng.randrange(20), f"s{rng.randrange(20)}"]) for _ in range(rng.randrange(9, 40))]
        if rng.random() < 0.2:
            arg.append(rng.choice([None, True, 2.5, [1, 2]]))  # not plain: the original path
        field = rng.choice(["x", "y.z", "x.0"])
        filters.append({field: {"$in": arg}})
        filters.append({field: {"$in": arg}, "_id": {"$gte": 100}})
    before = [[query.matches(d, f) for d in docs] for f in filters]
    try:
        wire_server.patch_in_matcher()
        assert query._op_matches is not original
        after = [[query.matches(d, f) for d in docs] for f in filters]
    finally:
        query._op_matches = original
    assert sum(map(sum, before)) > 100  # the cases match something
    for f, b, a in zip(filters, before, after, strict=True):
        assert a == b, f


def test_id_point_write_patch_routes_findandmodify_writes_and_keeps_their_answers():
    """findAndModify's write filter ``{_id, $and: [query]}`` scanned the collection; patched, it is a point lookup."""
    import bson
    from secantus import storage

    from amdflow.testing import wire_server

    original = storage.Storage._try_index_id_keys
    store = storage.Storage(":memory:")
    ids = [bson.ObjectId() for _ in range(50)]
    store.insert("d", "c", [{"_id": oid, "fw_id": k, "state": "READY"} for k, oid in enumerate(ids)])
    write_filter = {"_id": ids[7], "$and": [{"fw_id": 7}]}
    assert original(store, "d", "c", write_filter) is None  # the unpatched write path: a collection scan
    try:
        wire_server.patch_id_point_writes()
        assert len(storage.Storage._try_index_id_keys(store, "d", "c", write_filter)) == 1  # one candidate
        # the whole filter is still tested: a query the document no longer satisfies writes nothing
        missed = store.update_matching("d", "c", {"_id": ids[8], "$and": [{"fw_id": 7}]}, {"$set": {"state": "RUNNING"}})
        hit = store.update_matching("d", "c", write_filter, {"$set": {"state": "RUNNING"}})
        none = store.update_matching("d", "c", {"_id": bson.ObjectId(), "$and": [{"fw_id": 7}]}, {"$set": {"state": "X"}})
    finally:
        storage.Storage._try_index_id_keys = original
    assert (missed["matched"], hit["matched"], hit["modified"], none["matched"]) == (0, 1, 1, 0)
    states = {d["fw_id"]: d["state"] for d in (bson.decode(b) for _, _, b in store._candidates_iter("d", "c", None))}
    assert states[7] == "RUNNING" and sum(s == "RUNNING" for s in states.values()) == 1
