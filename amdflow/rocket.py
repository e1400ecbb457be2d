"""The batched GPU rocket: many predict Fireworks, one batched CGCNN pass, proper launches.

A plain rocket runs one Firework at a time; for a 1 ms forward pass the per-Firework
overhead dominates. This rocket checks out up to ``batch_size`` READY predict Fireworks
through the LaunchPad API (``checkout_fw``: a launch document, RUNNING state and host
per Firework, exactly as ``rlaunch`` makes them), featurizes them in worker processes,
predicts them in one batch, and completes each launch with the same FWAction the
PredictTask would return (``complete_launch``), so ``lpad detect_lostruns`` and
``lpad rerun_fws`` work per candidate. A candidate that fails fizzles alone. It loops
until no predict work is ready or its time limit is reached.
"""

from __future__ import annotations

import os
import socket
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


def run_batched_rocket(lp: Any, batch_size: int = 256, time_limit_s: float | None = None, workers: int = 1,
                       campaign: str | None = None, progress: Any = None) -> RocketReport:
    """Run predict Fireworks in batches until none is ready (or the time limit)."""
    from fireworks import FWAction, FWorker

    from amdflow import stages
    from amdflow.firetasks.stages import predict_action

    db = AmdflowDB.from_launchpad(lp)
    host = socket.gethostname()
    query: dict[str, Any] = {"spec.amdflow_stage": "predict"}
    if campaign:
        query["spec.campaign"] = campaign
    fworker = FWorker(name=f"amdflow-batched-rocket@{host}", category="gpu", query=query)
    report = RocketReport()
    start = time.perf_counter()
    launch_dir = os.getcwd()
    while time_limit_s is None or time.perf_counter() - start < time_limit_s:
        batch = []
        while len(batch) < batch_size:
            fw, launch_id = lp.checkout_fw(fworker, launch_dir, host=host)
            if fw is None:
                break
            batch.append((fw, launch_id))
        if not batch:
            break
        report.batches += 1
        ids = [fw.spec["candidate_id"] for fw, _ in batch]
        try:
            outcomes = {o.candidate_id: o for o in stages.predict_stage(db, ids, workers=workers)}
            failure = None
        except Exception as err:  # the whole batch failed (database, checkpoint): fizzle each launch
            outcomes, failure = {}, err
            for cid in ids:
                stages.record_failure(db, cid, "predict", err)
        for fw, launch_id in batch:
            out = outcomes.get(fw.spec["candidate_id"])
            if out is not None and not out.error:
                lp.ping_launch(launch_id)
                lp.complete_launch(launch_id, predict_action(out), "COMPLETED")
                report.fireworks += 1
            else:
                message = out.error if out is not None else f"{type(failure).__name__}: {failure}"
                trace = traceback.format_exception(failure) if failure is not None else []
                lp.complete_launch(launch_id, FWAction(stored_data={"_message": f"predict: {message}",
                                                                   "_exception": {"_stacktrace": "".join(trace) or message}}), "FIZZLED")
                report.fizzled += 1
        if progress:
            progress(report.fireworks + report.fizzled, 0, "batched predictions")
    report.seconds = time.perf_counter() - start
    return report
