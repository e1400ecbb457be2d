"""The bulk check-out/completion leaves the database exactly as FireWorks' per-Firework API does.

Two identical LaunchPads get the same workflows (amdflow's candidate and reference
workflows, plus one predict Firework with a ``_dupefinder`` that must take FireWorks' own
path). One is driven by ``checkout_fw`` + ``complete_launch`` per Firework (what
``rlaunch`` does), the other by :class:`amdflow.batch_launch.BatchLauncher`. The
Firework, launch and workflow documents must then be equal, field by field, apart from
timestamps and ``_id``s. Runs on the in-process store and on the wire server.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

HOST, IP = "node001", "10.0.0.1"


def _workflows():
    from fireworks import Firework, ScriptTask, Workflow
    from fireworks.user_objects.dupefinders.dupefinder_exact import DupeFinderExact

    from amdflow.workflows import candidate_workflow, reference_workflow

    wfs = [candidate_workflow(f"cand{k:03d}", "camp", f"Al{k}Ni") for k in range(9)]
    wfs.append(reference_workflow("camp", "Al", ["fcc", "bcc"]))
    odd = Firework(ScriptTask.from_str("true"), spec={"_category": "gpu", "amdflow_stage": "predict", "_priority": 1e4,
                                                      "_dupefinder": DupeFinderExact()}, name="with dupefinder")
    wfs.append(Workflow([odd, Firework(ScriptTask.from_str("true"), name="child")], {odd: []}, name="odd"))
    return wfs


def _action(fw, k: int):
    """Pass (children get a priority), defuse the workflow, or fizzle: one of each in turn."""
    from fireworks import FWAction

    kind = k % 3
    if kind == 0:
        return FWAction(stored_data={"passed": True}, update_spec={"_priority": round(0.1 * k, 6)}), "COMPLETED"
    if kind == 1:
        return FWAction(stored_data={"passed": False}, defuse_workflow=True), "COMPLETED"
    return FWAction(stored_data={"_message": f"predict: broken {fw.fw_id}"}), "FIZZLED"


def _normalized(lp) -> dict:
    def types(d: dict, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in d:
                d[key] = type(d[key]).__name__

    fws = {d["fw_id"]: d for d in lp.fireworks.find({}, {"_id": 0})}
    launches = {d["launch_id"]: d for d in lp.launches.find({}, {"_id": 0})}
    lid_fw = {lid: d["fw_id"] for lid, d in launches.items()}
    for d in fws.values():
        types(d, ("updated_on", "created_on"))
        d["launches"] = sorted(lid_fw[i] for i in d.get("launches", []))
    norm_launches = {}
    for d in launches.values():
        d.pop("launch_id")
        types(d, ("time_start", "time_end", "runtime_secs"))
        # states in order, and each timestamp's stored type (FireWorks stores ISO strings; detect_lostruns compares them)
        d["state_history"] = [{k: (v if k == "state" else type(v).__name__) for k, v in h.items()} for h in d["state_history"]]
        norm_launches[d["fw_id"]] = d
    wfs = {}
    for d in lp.workflows.find({}, {"_id": 0}):
        types(d, ("updated_on", "created_on"))
        wfs[d["name"]] = d
    return {"fireworks": fws, "launches": norm_launches, "workflows": wfs}


@pytest.fixture(params=["in-process", pytest.param("wire", marks=pytest.mark.multiprocess)])
def two_launchpads(request, monkeypatch):
    from fireworks import LaunchPad

    if request.param == "in-process":
        lp = request.getfixturevalue("lpad")
        import fireworks.core.launchpad as fw_launchpad

        other = fw_launchpad.LaunchPad(host="localhost", name="amdflow_test_b", strm_lvl="ERROR")
        other.reset(password=None, require_password=False)
        yield lp, other
        return
    uri = request.getfixturevalue("mongo_uri")
    names = [f"amdflow_eq_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    lps = [LaunchPad(host=uri, name=n, strm_lvl="ERROR") for n in names]
    for lp in lps:
        lp.reset(password=None, require_password=False)
    yield tuple(lps)
    import pymongo

    for n in names:
        pymongo.MongoClient(uri).drop_database(n)


def test_bulk_checkout_and_completion_equal_fireworks_api(two_launchpads, tmp_path):
    from fireworks import FWorker

    from amdflow.batch_launch import BatchLauncher

    per_fw, batched = two_launchpads
    for lp in (per_fw, batched):
        for wf in _workflows():
            lp.add_wf(wf)
    fworker = FWorker(name="gpu-rocket", category="gpu", query={"spec.amdflow_stage": "predict"})

    # FireWorks' API, one Firework at a time
    taken = []
    while True:
        fw, launch_id = per_fw.checkout_fw(fworker, str(tmp_path), host=HOST, ip=IP)
        if fw is None:
            break
        taken.append((fw, launch_id))
    rerun = sorted(fw.fw_id for fw, _ in taken)[1]  # rerun by hand while running: its completion must not revive it
    per_fw.rerun_fw(rerun)
    for k, (fw, launch_id) in enumerate(sorted(taken, key=lambda t: t[0].fw_id)):
        per_fw.ping_launch(launch_id)
        action, state = _action(fw, k)
        per_fw.complete_launch(launch_id, action, state)

    # the same through the bulk path, in two batches
    launcher = BatchLauncher(batched, fworker, str(tmp_path), host=HOST, ip=IP)
    claims = launcher.checkout(6) + launcher.checkout(100)
    assert launcher.checkout(100) == []
    assert len(claims) == len(taken) == 10
    assert sum(not c.bulk for c in claims) == 1  # the _dupefinder Firework took FireWorks' path
    running = batched.fireworks.count_documents({"state": "RUNNING"})
    assert running == 10
    assert all(s == "RUNNING" for wf in batched.workflows.find({"metadata.amdflow": "candidate"}) for s in [wf["state"]])
    launcher.ping(claims)
    # lost-run detection sees every pinged launch (nothing is changed: no fizzle, no rerun)
    lost_launches, _, inconsistent = batched.detect_lostruns(expiration_secs=-5)
    assert len(lost_launches) == 10 and not inconsistent
    batched.rerun_fw(rerun)
    launcher.complete([(c, *_action(c.fw, k)) for k, c in enumerate(sorted(claims, key=lambda c: c.fw_id))])

    a, b = _normalized(per_fw), _normalized(batched)
    for part in ("fireworks", "launches", "workflows"):
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert a[part][key] == b[part][key], (part, key)
    # the known answer, not only equality: 3 workflows passed (dedup READY with the priority), 3 defused, 3 fizzled
    states = [wf["state"] for wf in batched.workflows.find({"metadata.amdflow": "candidate"})]
    assert sorted(states) == ["DEFUSED"] * 2 + ["FIZZLED"] * 3 + ["READY"] + ["RUNNING"] * 3
    assert batched.fireworks.find_one({"fw_id": rerun})["state"] == "READY"
    ready = list(batched.fireworks.find({"state": "READY", "spec.amdflow_stage": "dedup"}))
    assert len(ready) == 3 and all("_priority" in d["spec"] and d["spec"]["_priority"] < 1 for d in ready)
    assert batched.workflows.count_documents({"locked": {"$exists": True}}) == 0
    assert batched.fireworks.count_documents({"amdflow_claim": {"$exists": True}}) == 0


def test_workflow_locked_by_another_process_waits_for_it(lpad, tmp_path):
    """A workflow another process holds (FireWorks' WFLock) is refreshed through FireWorks' path once free."""
    from fireworks import FWAction, FWorker

    from amdflow.batch_launch import BatchLauncher
    from amdflow.workflows import candidate_workflow

    for k in range(3):
        lpad.add_wf(candidate_workflow(f"c{k}", "camp", "AlNi"))
    launcher = BatchLauncher(lpad, FWorker(category="gpu"), str(tmp_path))
    claims = launcher.checkout(10)
    assert len(claims) == 3
    held = claims[0].fw_id
    lpad.workflows.update_one({"nodes": held}, {"$set": {"locked": True}})
    release = threading.Timer(0.5, lambda: lpad.workflows.update_one({"nodes": held}, {"$unset": {"locked": True}}))
    release.start()
    start = time.perf_counter()
    launcher.complete([(c, FWAction(update_spec={"_priority": 1.0}), "COMPLETED") for c in claims])
    assert time.perf_counter() - start >= 0.4  # it waited for the other process's lock
    assert lpad.fireworks.count_documents({"state": "COMPLETED"}) == 3
    assert lpad.fireworks.count_documents({"state": "READY", "spec.amdflow_stage": "dedup"}) == 3
    assert lpad.workflows.count_documents({"locked": {"$exists": True}}) == 0


def test_checkout_honours_fworker_pinning_as_fireworks_does(lpad, tmp_path):
    """`_fworker` is tested on the returned documents (no `$or` sent): the same Fireworks as FireWorks' own query.

    Five of the first page are pinned to another worker, so the first page holds too few for the batch.
    """
    from fireworks import FWorker

    from amdflow.batch_launch import BatchLauncher, _split_fworker_clause
    from amdflow.workflows import candidate_workflow

    pins = ["other"] * 5 + [None, "me", ["me", "other"], ["other"], "me"] + [None] * 4
    for k, pin in enumerate(pins):
        wf = candidate_workflow(f"c{k:02d}", "camp", "AlNi")
        for fw in wf.fws:
            fw.spec["_priority"] = 100 - k  # the pinned-elsewhere ones come first in sort order
            if pin is not None:
                fw.spec["_fworker"] = pin
        lpad.add_wf(wf)
    me = FWorker(name="me", category="gpu", query={"spec.amdflow_stage": "predict"})
    expected = sorted(d["fw_id"] for d in lpad.fireworks.find({**me.query, "state": "READY"}, {"fw_id": 1}))
    assert len(expected) == 8  # None, "me", ["me", ...], "me", 4 x None: FireWorks' own query, run by the database
    query, _ = _split_fworker_clause(me.query, "me")
    assert "$or" not in query
    claims = BatchLauncher(lpad, me, str(tmp_path)).checkout(3)
    assert len(claims) == 3
    got = [c.fw_id for c in claims]
    rest = BatchLauncher(lpad, me, str(tmp_path)).checkout(100)
    assert sorted(got + [c.fw_id for c in rest]) == expected
    # the highest priorities this worker may run came first
    assert [c.fw.spec.get("_fworker") for c in claims] == [None, "me", ["me", "other"]]
    # another $or is not taken apart
    custom = {"$or": [{"spec.x": 1}, {"spec.y": 2}]}
    assert _split_fworker_clause(custom, "me")[0] == custom


def test_stale_claims_and_locks_are_released(lpad, tmp_path):
    """A claim (RESERVED, no launch) or batch lock left by a killed rocket returns to READY / unlocked."""
    import datetime as dt

    from fireworks import FWorker

    from amdflow.batch_launch import CLAIM, LOCK_PREFIX, BatchLauncher
    from amdflow.workflows import candidate_workflow

    lpad.add_wf(candidate_workflow("c0", "camp", "AlNi"))
    fw_id = lpad.fireworks.find_one({"spec.amdflow_stage": "predict"})["fw_id"]
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    lpad.fireworks.update_one({"fw_id": fw_id}, {"$set": {"state": "RESERVED", CLAIM: {"token": "dead", "at": old}}})
    lpad.workflows.update_one({"nodes": fw_id}, {"$set": {"locked": f"{LOCK_PREFIX}{old.isoformat()}:1:dead"}})
    launcher = BatchLauncher(lpad, FWorker(category="gpu"), str(tmp_path))
    claims = launcher.checkout(5)
    assert [c.fw_id for c in claims] == [fw_id]
    assert lpad.workflows.count_documents({"locked": {"$exists": True}}) == 0
    # a fresh claim of another rocket is left alone
    lpad.add_wf(candidate_workflow("c1", "camp", "AlNi"))
    other = lpad.fireworks.find_one({"spec.amdflow_stage": "predict", "state": "READY"})["fw_id"]
    lpad.fireworks.update_one({"fw_id": other}, {"$set": {"state": "RESERVED", CLAIM: {"token": "live", "at": dt.datetime.now(dt.UTC)}}})
    launcher.release_stale()
    assert lpad.fireworks.find_one({"fw_id": other})["state"] == "RESERVED"


def test_checkout_never_overwrites_a_workflow_changed_meanwhile(lpad, tmp_path, monkeypatch):
    """The lock-free check-out update applies only to an unchanged workflow; a changed one takes FireWorks' path."""
    from fireworks import FWorker

    import amdflow.batch_launch as bl
    from amdflow.workflows import candidate_workflow

    for k in range(3):
        lpad.add_wf(candidate_workflow(f"c{k}", "camp", "AlNi"))
    target = lpad.workflows.find_one({"metadata.candidate_id": "c1"})
    analyze = min(target["nodes"])  # FireWorks numbers a workflow's Fireworks last-created first
    real = bl.bulk_write

    def concurrent_pause_first(coll, ops):
        if coll.name == "workflows" and lpad.fireworks.find_one({"fw_id": analyze})["state"] == "WAITING":  # another process pauses c1's analyze Firework between our read and our write
            lpad.pause_fw(analyze)
        return real(coll, ops)

    monkeypatch.setattr(bl, "bulk_write", concurrent_pause_first)
    claims = bl.BatchLauncher(lpad, FWorker(category="gpu"), str(tmp_path)).checkout(10)
    assert len(claims) == 3
    for wf in lpad.workflows.find():
        predict = max(wf["nodes"])
        assert wf["fw_states"][str(predict)] == "RUNNING"
        if wf["metadata"]["candidate_id"] == "c1":  # the pause survived: FireWorks' refresh merged both changes
            assert wf["fw_states"][str(analyze)] == "PAUSED" and wf["state"] == "PAUSED"
        else:
            assert wf["state"] == "RUNNING"


def test_rerun_lost_recovers_a_batch_killed_while_completing(db, tmp_path):
    """A batch killed inside its completion leaves RUNNING launches and a locked workflow; `rerun --lost` frees both.

    FireWorks' own `detect_lostruns --rerun` would wait 5 minutes on such a lock and fail;
    amdflow's locks carry their time, so `amdflow rerun --lost` releases the stale ones first.
    """
    import datetime as dt

    from fireworks import FWorker

    from amdflow.batch_launch import LOCK_PREFIX, BatchLauncher
    from amdflow.ops import rerun_lost
    from amdflow.workflows import candidate_workflow

    lp = db.launchpad
    for k in range(2):
        lp.add_wf(candidate_workflow(f"c{k}", "camp", "AlNi"))
    claims = BatchLauncher(lp, FWorker(category="gpu"), str(tmp_path)).checkout(5)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    lp.workflows.update_one({"nodes": claims[0].fw_id}, {"$set": {"locked": f"{LOCK_PREFIX}{old.isoformat()}:999:dead"}})
    found = rerun_lost(db, "camp", lost_after_s=-5, stale_after_s=120)
    assert found == {"claims_released": 0, "locks_released": 1, "fireworks_locks_released": 0, "lost_launches": 2, "rerun_fireworks": 2,
                     "dead_checkouts": 0}
    assert {lp.get_fw_by_id(c.fw_id).state for c in claims} == {"READY"}
    assert lp.workflows.count_documents({"locked": {"$exists": True}}) == 0
    assert sorted(ln["state"] for ln in lp.launches.find()) == ["FIZZLED", "FIZZLED"]  # kept as history


def test_fireworks_own_lock_left_behind_is_released_only_when_unused(db, tmp_path):
    """FireWorks' lock (``locked: True``, no time) left by a rocket whose check-out died, e.g. when the database restarted.

    Before: `amdflow rerun --fizzled` sat silently in FireWorks' WFLock for 300 s on it (CI's
    database-restart fault test timed out there). Now `--fizzled` skips such a workflow within
    its short wait and says so, and `--lost` releases a lock that stays unchanged, guarding no
    change, for --stale-after seconds, while a lock in use (its workflow changing) is kept.
    """
    from fireworks import FWorker

    from amdflow.batch_launch import BatchLauncher
    from amdflow.ops import rerun_fizzled, rerun_lost
    from amdflow.workflows import candidate_workflow

    lp = db.launchpad
    for k in range(3):
        lp.add_wf(candidate_workflow(f"c{k}", "camp", "AlNi"))
    (lost,) = BatchLauncher(lp, FWorker(category="gpu"), str(tmp_path)).checkout(1)
    live = next(wf for wf in lp.workflows.find() if lost.fw_id not in wf["nodes"])
    failed = next(wf for wf in lp.workflows.find() if lost.fw_id not in wf["nodes"] and wf["_id"] != live["_id"])
    busy_fw = max(live["nodes"])
    fizzled_fw = max(failed["nodes"])
    lp.fireworks.update_one({"fw_id": fizzled_fw}, {"$set": {"state": "FIZZLED"}})
    for wf in (lp.workflows.find_one({"nodes": lost.fw_id}), live, failed):
        lp.workflows.update_one({"_id": wf["_id"]}, {"$set": {"locked": True}})

    # --fizzled: the locked workflow is skipped within its wait, not 300 s, and named
    t0 = time.monotonic()
    done = rerun_fizzled(db, "camp", lock_wait_s=0.5)
    assert time.monotonic() - t0 < 5
    assert done.reset == [] and done.locked == [fizzled_fw]
    assert lp.get_fw_by_id(fizzled_fw).state == "FIZZLED"

    stop = threading.Event()

    def rocket_at_work() -> None:  # a live holder: what its lock guards keeps changing
        k = 0
        while not stop.is_set():
            k += 1
            lp.fireworks.update_one({"fw_id": busy_fw}, {"$set": {"updated_on": f"2026-01-01T00:00:{k % 60:02d}.{k}"}})
            if k == 6:  # a rocket changes a Firework once, then blocks on the stale lock: quiet from here on
                lp.fireworks.update_one({"fw_id": fizzled_fw}, {"$set": {"updated_on": "2026-01-01T00:00:00.5"}})
            time.sleep(0.05)

    worker = threading.Thread(target=rocket_at_work)
    worker.start()
    watched = []
    t1 = time.monotonic()
    try:
        found = rerun_lost(db, "camp", lost_after_s=-5, stale_after_s=1.0, on_watch=lambda n, s: watched.append((n, s)))
    finally:
        stop.set()
        worker.join()
    assert watched == [(3, 1.0)]
    assert 1.9 < time.monotonic() - t1 < 4  # watched to 2 x stale_after: the busy lock kept changing to the end
    assert found["fireworks_locks_released"] == 2 and found["lost_launches"] == 1 and found["rerun_fireworks"] == 1
    assert lp.workflows.find_one({"_id": live["_id"]})["locked"] is True  # in use: kept
    assert "locked" not in lp.workflows.find_one({"nodes": lost.fw_id})
    assert lp.get_fw_by_id(lost.fw_id).state == "READY"
    assert rerun_fizzled(db, "camp", lock_wait_s=0.5).reset == [fizzled_fw]
    assert lp.get_fw_by_id(fizzled_fw).state in ("READY", "WAITING")


def test_a_checkout_that_died_before_its_launch_is_reset_by_rerun_lost(db, tmp_path):
    """FireWorks' check-out marks a Firework RESERVED, then writes its launch; a rocket dying in between leaves it RESERVED.

    What CI's database-restart fault test met: 'analyze references Ni' stayed RESERVED with no
    launch, so neither `detect_lostruns` (no launch to go stale) nor any rocket (they take READY
    ones) ever ran it. `rerun --lost` resets such a Firework once older than --stale-after, and
    leaves a young check-out (a live rocket in the middle of it) and a queue reservation alone.
    """
    import datetime as dt

    from fireworks import FWorker

    from amdflow.ops import dead_checkouts, rerun_lost
    from amdflow.workflows import candidate_workflow

    lp = db.launchpad
    for k in range(3):
        lp.add_wf(candidate_workflow(f"c{k}", "camp", "AlNi"))
    dead = lp._get_a_fw_to_run({"spec.campaign": "camp"})  # the first half of checkout_fw, then the rocket died
    young = lp._get_a_fw_to_run({"spec.campaign": "camp"})
    queued, _ = lp.reserve_fw(FWorker(), str(tmp_path), fw_id=lp.fireworks.find_one({"state": "READY"})["fw_id"])
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    for fw in (dead, queued):
        lp.fireworks.update_one({"fw_id": fw.fw_id}, {"$set": {"updated_on": old}})
    assert {lp.get_fw_by_id(f.fw_id).state for f in (dead, young, queued)} == {"RESERVED"}
    assert dead_checkouts(lp, "camp", 120) == [dead.fw_id]
    assert dead_checkouts(lp, "other", 120) == []

    found = rerun_lost(db, "camp", lost_after_s=3600, stale_after_s=120)
    assert found["dead_checkouts"] == 1 and found["lost_launches"] == 0
    assert lp.get_fw_by_id(dead.fw_id).state == "READY"
    assert lp.workflows.find_one({"nodes": dead.fw_id})["fw_states"][str(dead.fw_id)] == "READY"
    assert lp.get_fw_by_id(young.fw_id).state == "RESERVED" and lp.get_fw_by_id(queued.fw_id).state == "RESERVED"
    # and a rocket now runs it
    assert lp.checkout_fw(FWorker(query={"fw_id": dead.fw_id}), str(tmp_path))[0].fw_id == dead.fw_id
