"""The batched GPU rocket: many predict (or funnel) Fireworks, one batched pass, proper launches.

A plain rocket runs one Firework at a time; for a 1 ms forward pass the per-Firework
overhead dominates. This rocket checks out up to ``batch_size`` READY predict Fireworks
at once (:class:`amdflow.batch_launch.BatchLauncher`: a launch document, RUNNING state and
host per Firework, exactly as ``rlaunch`` makes them, in about ten bulk database commands
per batch instead of ~33 per Firework), featurizes them in worker processes, predicts them
in one batch, pings the launches while it works, and completes every launch with the
FWAction the PredictTask would return, so ``lpad detect_lostruns`` and ``lpad rerun_fws``
work per candidate. A candidate that fails fizzles alone. It loops until no predict work
is ready or its time limit is reached.

The same rocket runs dedup Fireworks (``stage="dedup"``, a CPU rocket): a batch is decided
bucket by bucket in one greedy pass each (:func:`amdflow.stages.dedup_many`) and completed in
bulk. And it runs funnel Fireworks (``stage="funnel"``): a batch of candidates is
relaxed together by the funnel's universal potential (:func:`amdflow.stages.funnel_stage`),
its ML hull built once, and each launch completed with the FunnelTask's FWAction.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from amdflow.db import AmdflowDB


@dataclass
class RocketReport:
    fireworks: int = 0
    fizzled: int = 0
    batches: int = 0
    seconds: float = 0.0


class _Heartbeat:
    """Ping a batch's launches every ``every_s`` seconds while it runs (FireWorks' PING_TIME_SECS)."""

    def __init__(self, launcher: Any, claims: list[Any], every_s: float) -> None:
        self.launcher, self.claims, self.every_s = launcher, claims, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="amdflow-ping")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.launcher.ping(self.claims)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


BATCHED_STAGES = ("predict", "dedup", "funnel")
STAGE_CATEGORY = {"predict": "gpu", "dedup": "cpu", "funnel": "gpu"}  # the Fireworks' _category (amdflow.workflows)


def run_batched_rocket(lp: Any, batch_size: int = 256, time_limit_s: float | None = None, workers: int = 1,
                       campaign: str | None = None, progress: Any = None, ping_s: float | None = None,
                       pipeline: bool | None = None, stage: str = "predict", max_batches: int | None = None) -> RocketReport:
    """Run ``stage`` Fireworks (predict: CGCNN; funnel: the universal potential) in batches until none is ready.

    A funnel batch is relaxed together (SevenNet through torch-sim; CHGNet in ``workers``
    processes on a CPU), its hull built once, and each candidate decided.

    ``pipeline`` (default: on for MongoDB, off for the in-process store): the LaunchPad
    bookkeeping runs in a background thread, overlapping the prediction of batch k with
    the check-out of batch k+1 and the completion of batch k-1, so the GPU does not wait
    for the database. The rocket then holds at most two batches at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    from fireworks import FWorker
    from fireworks.fw_config import PING_TIME_SECS

    from amdflow.batch_launch import BatchLauncher

    if stage not in BATCHED_STAGES:
        raise ValueError(f"the batched rocket runs {' or '.join(BATCHED_STAGES)} Fireworks, not {stage!r}")
    db = AmdflowDB.from_launchpad(lp)
    host = socket.gethostname()
    query: dict[str, Any] = {"spec.amdflow_stage": stage}
    if campaign:
        query["spec.campaign"] = campaign
    fworker = FWorker(name=f"amdflow-batched-rocket@{host}", category=STAGE_CATEGORY[stage], query=query)
    launcher = BatchLauncher(lp, fworker, os.getcwd(), host=host)
    if pipeline is None:
        pipeline = not type(lp.fireworks).__module__.startswith("mongomock")  # mongomock is not thread-safe
    report = RocketReport()
    start = time.perf_counter()

    checkouts = 0

    def time_left() -> bool:  # and batches left: called once before each check-out
        nonlocal checkouts
        if max_batches is not None and checkouts >= max_batches:
            return False
        checkouts += 1
        return time_limit_s is None or time.perf_counter() - start < time_limit_s

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="amdflow-launchpad") as io:
        submit = io.submit if pipeline else _run_now
        pending = []  # completions in flight (their errors surface below)
        next_claims = submit(launcher.checkout, batch_size) if time_left() else None
        while next_claims is not None:
            claims = next_claims.result()
            if not claims:
                break
            next_claims = submit(launcher.checkout, batch_size) if time_left() else None
            report.batches += 1
            with _Heartbeat(launcher, claims, ping_s or PING_TIME_SECS):
                results = _BATCHES[stage](db, claims, workers, report)
            pending.append(submit(launcher.complete, results))
            while pending and pending[0].done():
                pending.pop(0).result()
            if progress:
                progress(report.fireworks + report.fizzled, 0, f"batched {stage}")
        for fut in pending:
            fut.result()
    report.seconds = time.perf_counter() - start
    return report


def run_gpu_rocket(lp: Any, predict_batch: int = 256, funnel_batch: int = 64, time_limit_s: float | None = None,
                   predict_workers: int = 1, funnel_workers: int = 1, campaign: str | None = None, progress: Any = None,
                   ping_s: float | None = None) -> RocketReport:
    """All the GPU queue's work until none is ready (``amdflow rocket --stage auto``).

    In priority order, again after every funnel batch: predict batches, the funnel level's
    reference and known-phase relaxations (few and small: one Firework at a time, by
    FireWorks' own rocket), then one funnel batch.
    """
    total = RocketReport()
    start = time.perf_counter()

    def left() -> float | None:
        return None if time_limit_s is None else time_limit_s - (time.perf_counter() - start)

    def add(r: RocketReport) -> int:
        total.fireworks, total.fizzled, total.batches = total.fireworks + r.fireworks, total.fizzled + r.fizzled, total.batches + r.batches
        return r.fireworks + r.fizzled

    while (rest := left()) is None or rest > 0:
        ran = add(run_batched_rocket(lp, predict_batch, rest, predict_workers, campaign, progress, ping_s, stage="predict"))
        references = run_level_references(lp, "funnel", campaign)
        total.fireworks += references
        ran += references
        ran += add(run_batched_rocket(lp, funnel_batch, left(), funnel_workers, campaign, progress, ping_s, stage="funnel",
                                      max_batches=1))
        if not ran:
            break
    total.seconds = time.perf_counter() - start
    return total


def run_level_references(lp: Any, level: str, campaign: str | None = None) -> int:
    """Run the READY reference and known-phase relaxations of ``level`` one by one (FireWorks' rocket); how many ran."""
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket

    query: dict[str, Any] = {"spec.amdflow_level": level, "spec.amdflow_stage": {"$in": ["reference", "known"]}}
    if campaign:
        query["spec.campaign"] = campaign
    fworker = FWorker(name=f"amdflow-{level}-references@{socket.gethostname()}", category="gpu", query=query)
    ran = 0
    while launch_rocket(lp, fworker, strm_lvl="WARNING"):
        ran += 1
    return ran


class _Done:
    """A finished call with a Future's ``result``/``done`` (the pipeline switched off)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value

    def done(self) -> bool:
        return True


def _run_now(func: Any, *args: Any) -> _Done:
    return _Done(func(*args))


def _run_batch(db: AmdflowDB, claims: list[Any], workers: int, report: RocketReport, stage: str,
               run: Any, action: Any) -> list[tuple[Any, Any, str]]:
    """One batch of ``stage``; (claim, FWAction, state) for each launch. A broken candidate fizzles alone.

    ``run(db, ids, workers)`` returns outcomes with ``candidate_id`` and ``error``;
    ``action(outcome, spec)`` is the FWAction of a finished one (the Firetask's own).
    """
    from fireworks import FWAction

    from amdflow import stages

    ids = [c.fw.spec["candidate_id"] for c in claims]
    failure: BaseException | None = None
    try:
        outcomes = {o.candidate_id: o for o in run(db, ids, workers)}
    except Exception as err:  # the whole batch failed (database, checkpoint, model): fizzle each launch
        outcomes, failure = {}, err
        for cid in ids:
            stages.record_failure(db, cid, stage, err)
    results = []
    for claim in claims:
        out = outcomes.get(claim.fw.spec["candidate_id"])
        if out is not None and not out.error:
            results.append((claim, action(out, claim.fw.spec), "COMPLETED"))
            report.fireworks += 1
        else:
            message = out.error if out is not None else f"{type(failure).__name__}: {failure}"
            trace = "".join(traceback.format_exception(failure)) if failure is not None else message
            results.append((claim, FWAction(stored_data={"_message": f"{stage}: {message}",
                                                         "_exception": {"_stacktrace": trace}}), "FIZZLED"))
            report.fizzled += 1
    return results


def _predict_batch(db: AmdflowDB, claims: list[Any], workers: int, report: RocketReport) -> list[tuple[Any, Any, str]]:
    from amdflow import stages
    from amdflow.firetasks.stages import predict_action

    return _run_batch(db, claims, workers, report, "predict", lambda d, ids, w: stages.predict_stage(d, ids, workers=w),
                      lambda out, spec: predict_action(out))


def _dedup_batch(db: AmdflowDB, claims: list[Any], workers: int, report: RocketReport) -> list[tuple[Any, Any, str]]:
    from amdflow import stages
    from amdflow.firetasks.stages import dedup_action

    return _run_batch(db, claims, workers, report, "dedup", lambda d, ids, w: stages.dedup_many(d, ids), dedup_action)


def _funnel_batch(db: AmdflowDB, claims: list[Any], workers: int, report: RocketReport) -> list[tuple[Any, Any, str]]:
    from amdflow import stages
    from amdflow.firetasks.stages import funnel_action

    return _run_batch(db, claims, workers, report, "funnel", lambda d, ids, w: stages.funnel_stage(d, ids, workers=w),
                      funnel_action)


_BATCHES = {"predict": _predict_batch, "dedup": _dedup_batch, "funnel": _funnel_batch}
