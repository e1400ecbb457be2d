#!/usr/bin/env python
"""LaunchPad benchmarks on the MongoDB-wire test server (or AMDFLOW_TEST_MONGO_URI).

Figures: time to add 10,000 candidate workflows; per-Firework cost of predict Fireworks
through the batched rocket versus plain `rlaunch rapidfire`; predictions/s through the
LaunchPad versus raw batched inference on the same structures (`fraction_of_raw`);
throughput of 1, 2 and 4 rockets on trivial Fireworks; database commands per Firework,
counted with pymongo's command monitoring, for a load estimate at cluster scale.
The wire server is a test stand-in (Python, one findAndModify lock), so absolute rates
are a lower bound of a real MongoDB's. Last line: one JSON object; `--write` appends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _counter_class():
    from pymongo import monitoring

    class Counter(monitoring.CommandListener):
        """Counts commands by name."""

        def __init__(self) -> None:
            self.counts: dict[str, int] = {}
            self.server_s = 0.0  # time the server took, as the driver saw it (round trip)
            self.doc_writes = 0  # documents named in write commands (updates, inserts)

        def started(self, event) -> None:
            self.counts[event.command_name] = self.counts.get(event.command_name, 0) + 1
            for key in ("updates", "documents", "deletes"):
                self.doc_writes += len(event.command.get(key, ()))
            if event.command_name == "findAndModify":  # FireWorks' find_one_and_update/replace: one document each
                self.doc_writes += 1

        def succeeded(self, event) -> None:
            self.server_s += event.duration_micros / 1e6

        def failed(self, event) -> None:
            pass

        def total(self) -> int:
            return sum(v for k, v in self.counts.items() if k not in ("hello", "isMaster", "ismaster", "ping", "endSessions"))

    return Counter


def start_server(cache_size: str | None = None, log: Path | None = None) -> tuple[str, subprocess.Popen | None]:
    """The MongoDB-wire test server on a free port (or ``AMDFLOW_TEST_MONGO_URI``'s server). ``cache_size``: its
    WiredTiger cache (default 1G), which in memory holds the whole database: past it, every write fails with
    ``internal server error`` (met at 100k candidates). ``log``: where its stderr goes (its tracebacks)."""
    import pymongo

    uri = os.environ.get("AMDFLOW_TEST_MONGO_URI")
    if uri:
        return uri, None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = ["--cache-size", cache_size] if cache_size else []
    proc = subprocess.Popen([sys.executable, "-m", "amdflow.testing.wire_server", "--host", "127.0.0.1", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=log.open("a") if log else subprocess.DEVNULL)
    uri = f"mongodb://127.0.0.1:{port}/"
    for _ in range(150):
        try:
            pymongo.MongoClient(uri, serverSelectionTimeoutMS=300).admin.command("ping")
            return uri, proc
        except pymongo.errors.PyMongoError:
            time.sleep(0.2)
    raise SystemExit("wire server did not start")


def lp_file(uri: str, folder: Path) -> Path:
    import yaml

    path = folder / f"lp-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"host": uri, "name": f"bench_{uuid.uuid4().hex[:8]}", "strm_lvl": "ERROR",
                                    "mongoclient_kwargs": {"serverSelectionTimeoutMS": 5000}}))
    return path


def campaign(name: str, n_scales: int, folder: Path):
    from amdflow.campaign import campaign_from_dict

    scales = [round(0.9 + 0.2 * i / max(n_scales - 1, 1), 6) for i in range(n_scales)]
    return campaign_from_dict({"name": name, "elements": ["Fe", "Al", "Ni", "Co"],
                               "templates": [{"source": "aflow", "max_sites": 6}],
                               "generate": {"lattice_scales": scales}, "screen": {"max_formation_energy_per_atom": 5.0},
                               "output_dir": str(folder / name)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=int, default=10_000, help="workflows to add")
    parser.add_argument("--predict", type=int, default=1000, help="predict Fireworks through the batched rocket")
    parser.add_argument("--rlaunch", type=int, default=300, help="predict Fireworks through plain rlaunch (slow)")
    # the test server's $in lookups grow faster than linearly with the list (1,000 per batch: 34 ms per
    # Firework; 100: 18 ms), so the benchmark uses small batches; on MongoDB use ~1,000 (the GPU adapters do)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from pymongo import monitoring

    from amdflow.db import open_db
    from amdflow.ops import add_campaign
    from amdflow.settings import get_settings

    counter = _counter_class()()
    monitoring.register(counter)
    folder = Path(tempfile.mkdtemp(prefix="bench_lp_"))
    uri, server = start_server()
    figures: dict = {"date": datetime.now(UTC).strftime("%Y-%m-%d")}
    try:
        # 1. add 10,000 workflows (candidates generated and inserted, then workflows bulk-added)
        big = campaign("add", 1, folder)
        from amdflow.generate import GenerateReport, generate_candidates

        rep = GenerateReport()
        for _ in generate_candidates(big, rep, build=False):
            pass
        big = campaign("add", -(-args.add // rep.candidates), folder)
        lp_add = lp_file(uri, folder)
        with open_db(None, get_settings(launchpad_file=lp_add)) as db:
            start = time.perf_counter()
            report = add_campaign(db, big)
            figures["add_workflows"] = report.new_workflows
            figures["add_seconds"] = round(time.perf_counter() - start, 1)

        # 2./3. predict Fireworks: batched rocket vs rlaunch, and raw inference
        from amdflow.rocket import run_batched_rocket
        from amdflow.screen.predict import get_predictor, predict_sources

        get_predictor()
        small = campaign("predict", 1, folder)
        results = {}
        for kind in ("batched", "rlaunch"):
            lp_path = lp_file(uri, folder)
            with open_db(None, get_settings(launchpad_file=lp_path)) as db:
                add_campaign(db, small)
                n = args.predict if kind == "batched" else args.rlaunch
                ids = [c["candidate_id"] for c in db.candidates.find({}, {"candidate_id": 1}).limit(n)]
                if kind == "batched":
                    structures = [c["structure"] for c in db.candidates.find({"candidate_id": {"$in": ids}}, {"structure": 1})]
                # only the first N predict Fireworks stay READY
                keep = [c["fw_ids"]["predict"] for c in db.candidates.find({"candidate_id": {"$in": ids}}, {"fw_ids": 1})]
                db.launchpad.fireworks.update_many({"spec.amdflow_stage": "predict", "fw_id": {"$nin": keep}}, {"$set": {"state": "PAUSED"}})
                before, server_before, writes_before = counter.total(), counter.server_s, counter.doc_writes
                start = time.perf_counter()
                if kind == "batched":
                    run_batched_rocket(db.launchpad, batch_size=args.batch_size)
                    seconds = time.perf_counter() - start
                    results["batched_ops_per_fw"] = round((counter.total() - before) / len(ids), 2)
                    results["batched_server_s"] = round(counter.server_s - server_before, 2)
                    results["batched_doc_writes_per_fw"] = round((counter.doc_writes - writes_before) / len(ids), 1)
                else:
                    cwd = folder / "rl"
                    cwd.mkdir(exist_ok=True)
                    wfile = folder / "gpu.yaml"
                    wfile.write_text("name: gpu\ncategory: gpu\nquery: '{\"spec.amdflow_stage\": \"predict\"}'\n")
                    start = time.perf_counter()
                    subprocess.run([str(BIN / "rlaunch"), "-l", str(lp_path), "-w", str(wfile), "-s", "rapidfire", "--nlaunches", "0"],
                                   cwd=cwd, check=True, capture_output=True)
                    seconds = time.perf_counter() - start
                done = db.launchpad.fireworks.count_documents({"spec.amdflow_stage": "predict", "state": "COMPLETED"})
                results[kind] = (done, seconds)
        start = time.perf_counter()
        predict_sources(get_predictor(), structures)
        raw = time.perf_counter() - start
        n_b, t_b = results["batched"]
        n_r, t_r = results["rlaunch"]
        figures.update({
            "predict_fireworks": n_b, "batched_seconds": round(t_b, 2), "batched_ms_per_fw": round(1000 * t_b / n_b, 2),
            "rlaunch_fireworks": n_r, "rlaunch_seconds": round(t_r, 2), "rlaunch_ms_per_fw": round(1000 * t_r / n_r, 2),
            "raw_seconds": round(raw, 3), "raw_per_s": round(len(structures) / raw, 1), "batched_per_s": round(n_b / t_b, 1),
            "fraction_of_raw": round((n_b / t_b) / (len(structures) / raw), 3),
            "batched_ops_per_fw": results["batched_ops_per_fw"], "batch_size": args.batch_size,
            "batched_server_s": results["batched_server_s"], "batched_doc_writes_per_fw": results["batched_doc_writes_per_fw"],
        })

        # database commands per Firework of a plain rocket (in process, so the counter sees them)
        from fireworks import Firework, FWorker, LaunchPad, ScriptTask
        from fireworks.core.rocket_launcher import rapidfire

        lp_path = lp_file(uri, folder)
        lp = LaunchPad.from_file(str(lp_path))
        lp.reset(password=None, require_password=False, max_reset_wo_password=10**6)
        lp.bulk_add_wfs([Firework(ScriptTask.from_str("true")) for _ in range(50)])
        cwd = folder / "inproc"
        cwd.mkdir()
        before, writes_before = counter.total(), counter.doc_writes
        rapidfire(lp, FWorker(), m_dir=str(cwd), nlaunches=50, strm_lvl="ERROR")
        figures["rlaunch_ops_per_fw"] = round((counter.total() - before) / 50, 1)
        figures["rlaunch_doc_writes_per_fw"] = round((counter.doc_writes - writes_before) / 50, 1)

        # 4. 1, 2, 4 rockets on trivial Fireworks
        for k in (1, 2, 4):
            lp_path = lp_file(uri, folder)
            lp = LaunchPad.from_file(str(lp_path))
            lp.reset(password=None, require_password=False, max_reset_wo_password=10**6)
            lp.bulk_add_wfs([Firework(ScriptTask.from_str("true")) for _ in range(200)])
            start = time.perf_counter()
            procs = []
            for j in range(k):
                cwd = folder / f"r{k}_{j}"
                cwd.mkdir()
                procs.append(subprocess.Popen([str(BIN / "rlaunch"), "-l", str(lp_path), "-s", "rapidfire", "--nlaunches", "0"],
                                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for p in procs:
                p.wait()
            seconds = time.perf_counter() - start
            assert lp.launches.count_documents({}) == 200
            figures[f"rockets_{k}_fw_per_s"] = round(200 / seconds, 1)
    finally:
        if server is not None:
            server.terminate()
    if args.write:
        write_markdown(figures)
    print(json.dumps(figures))


def write_markdown(f: dict) -> None:
    """Replace the LaunchPad section of BENCHMARKS.md (or append it)."""
    gpu_rate = f["batched_per_s"]
    met = "met" if f["fraction_of_raw"] >= 0.5 else "NOT met on this server"
    section = f"""## LaunchPad (`scripts/bench_launchpad.py`, {f['date']})

On the MongoDB-wire test server (secantusdb 0.7.0b3: Python, findAndModify serialized), 2 cores shared by server and
rockets: a stand-in, so every rate here is a lower bound of a real MongoDB's.

- Adding {f['add_workflows']:,} candidate workflows (generate + insert candidates + bulk-add 4 Fireworks each): {f['add_seconds']} s.
- Predict Fireworks, per-Firework cost: batched rocket (batch {f['batch_size']}, bulk check-out/completion, pipelined;
  on this server larger batches are slower: its `$in` lookups grow faster than linearly, 1,000 per batch cost 34 ms per Firework)
  **{f['batched_ms_per_fw']} ms** per Firework ({f['predict_fireworks']} in {f['batched_seconds']} s, {gpu_rate} /s) against plain
  `rlaunch rapidfire` **{f['rlaunch_ms_per_fw']} ms** ({f['rlaunch_fireworks']} in {f['rlaunch_seconds']} s):
  {f['rlaunch_ms_per_fw'] / f['batched_ms_per_fw']:.0f}x less.
- Database commands per Firework: batched {f['batched_ops_per_fw']} (about ten bulk commands per batch; documents written
  per Firework: {f['batched_doc_writes_per_fw']}), plain rocket {f['rlaunch_ops_per_fw']} (documents written:
  {f['rlaunch_doc_writes_per_fw']}).
- Raw batched inference (featurize + CGCNN, one process) on the same structures: {f['raw_per_s']} /s. Through the LaunchPad
  the batched rocket reaches **{f['fraction_of_raw']:.1%} of raw** (`fraction_of_raw`); goal 50 %: {met}.
  The server spent {f['batched_server_s']} s answering the rocket's commands in its {f['batched_seconds']} s (the pipeline's
  two threads overlap, so the sum can exceed the wall time): the rocket waits on the server, not on inference. This Python server spends roughly 0.2-0.7 ms per document written or read (measured with single bulk commands of
  300 documents), so ~{f['batched_doc_writes_per_fw']} document writes plus the reads per Firework cost more than the
  ~{1000 / f['raw_per_s']:.1f} ms of inference. The bookkeeping is now per document, not per round trip; a server that
  writes a document in tens of microseconds (what MongoDB's bulk writes are built for) would leave inference the larger
  part. That is an expectation, not a measurement: no MongoDB can run here.
- Trivial Fireworks (`true`): 1 rocket {f['rockets_1_fw_per_s']} /s, 2 rockets {f['rockets_2_fw_per_s']} /s, 4 rockets
  {f['rockets_4_fw_per_s']} /s: rockets and server compete for 2 cores and the server's findAndModify lock serializes
  check-outs, so throughput flattens (contention, not lost work: every test run counts exactly one launch per Firework).

### Load estimate at 128 GPUs and 4,096 CPU cores (from the measured commands and documents per Firework)
- GPU side: per prediction the LaunchPad sees {f['batched_ops_per_fw']} commands and ~{f['batched_doc_writes_per_fw']} document
  writes (+ about as many reads). 128 batched rockets predicting R structures/s each send 128 x R x
  {f['batched_ops_per_fw']} commands/s: at R = 1,000 /s (a GPU's order of magnitude for small cells) that is
  {round(128 * 1000 * f['batched_ops_per_fw']):,} commands/s but {round(128 * 1000 * f['batched_doc_writes_per_fw']):,}
  document writes/s: the document rate, not the command rate, is the limit, so one MongoDB serves the predict stage at
  its bulk-write rate and the GPUs wait on it; with plain rockets the same work would be
  {round(128 * 1000 * f['rlaunch_ops_per_fw']):,} commands/s, far beyond one server. Predictions are a burst at the
  start of a campaign (a million candidates at 10,000 /s is under two minutes), so fewer GPUs per LaunchPad lose little.
- CPU side: {f['rlaunch_ops_per_fw']} commands per Firework (plain rockets). VASP relaxations on 32 cores of about an hour:
  4,096 cores = 128 concurrent jobs = ~0.04 Fireworks/s, about {round(128 / 3600 * f['rlaunch_ops_per_fw'] * 3, 1)}
  commands/s with dedup and analyze: negligible. The laptop engine (CHGNet, ~3 s per relaxation on one core) on 4,096
  cores would be ~1,400 Fireworks/s, ~{round(4096 / 3 * f['rlaunch_ops_per_fw']):,} commands/s: too many for one
  LaunchPad; at that scale relax on GPUs in batches too, or run CHGNet relaxations several per Firework.
"""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    start = text.find("## LaunchPad (")
    if start < 0:
        path.write_text(text.rstrip() + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    path.write_text(text[:start] + section + (text[end + 1:] if end >= 0 else ""))


if __name__ == "__main__":
    main()
