#!/usr/bin/env python
"""A campaign at scale, end to end through the CLI: on the MongoDB-wire test server, and on the embedded store.

Candidates: Ce-Fe-In on every AFLOW prototype of at most ``--max-sites`` sites, at as many
lattice scales (0.90-1.10) as it takes to reach ``--n`` (about 950 per scale at 12 sites).
Screen: exa-AMD's (CGCNN threshold 0.0, no funnel): the most candidates reach the dedup.
Relax: CHGNet, at most ``--relax-steps`` steps, under a DFT budget of ``--budget``: the
stand-in for the expensive stage; the rest wait as ``over_budget``.

Wire server (``--n``): ``amdflow add`` (its peak memory: it must stream), two batched predict
rockets, two batched dedup rockets, then ``amdflow run`` for references, relaxations and the
hull; ``amdflow status`` and ``amdflow report`` timed at that size, every read they send
explained (no collection scan), database bytes per candidate (``dbStats``: documents,
Fireworks, launches and indexes).

Embedded store (``--embedded-n``): ``amdflow add`` and ``amdflow run`` as a laptop user runs
them; ``--kill-after S`` kills the run with SIGKILL after S seconds, measures what was lost
(seconds since the last flush reached the disk) and resumes it.

Figures per stage (wall time, Fireworks/s, from the launches), the last line one JSON object;
``--write`` replaces this benchmark's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.bench_launchpad import lp_file, start_server  # noqa: E402

BIN = Path(sys.executable).parent
PER_SCALE_12_SITES = 951  # Ce-Fe-In candidates per lattice scale, AFLOW prototypes of at most 12 sites


def campaign_file(folder: Path, name: str, n: int, max_sites: int, budget: int, relax_steps: int) -> Path:
    import yaml

    from amdflow.campaign import campaign_from_dict
    from amdflow.generate import GenerateReport, generate_candidates

    def spec(scales: list[float]) -> dict[str, Any]:
        return {"name": name, "elements": ["Ce", "Fe", "In"], "templates": [{"source": "aflow", "max_sites": max_sites}],
                "generate": {"lattice_scales": scales},
                "screen": {"mode": "threshold", "max_formation_energy_per_atom": 0.0},
                "funnel": {"engine": "none"},
                "relax": {"engine": "chgnet", "max_steps": relax_steps, "budget": budget},
                "output_dir": str(folder / name)}

    rep = GenerateReport()
    for _ in generate_candidates(campaign_from_dict(spec([1.0])), rep, build=False):
        pass
    n_scales = max(1, -(-n // rep.candidates))
    scales = [round(0.9 + 0.2 * i / max(n_scales - 1, 1), 6) for i in range(n_scales)] if n_scales > 1 else [1.0]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec(scales), sort_keys=False))
    return path


def cli(args: list[str], env: dict[str, str], cwd: Path, log: Path, kill_after: float | None = None) -> dict[str, Any]:
    """Run ``amdflow ARGS``; wall time, peak RSS (this child's, from wait4), exit status, and its output's tail."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "amdflow"), *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        killed_at = None
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = time.time()
        _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    tail = log.read_text()[-3000:]
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and killed_at is None:
        raise SystemExit(f"amdflow {' '.join(args)} failed ({code}):\n{tail}")
    return {"s": round(took, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "killed_at": killed_at, "tail": tail}


def rockets(stage: str, n: int, env: dict[str, str], cwd: Path, campaign: str, batch: int) -> float:
    start = time.perf_counter()
    procs = []
    for i in range(n):
        d = cwd / f"{stage}-{i}"
        d.mkdir(exist_ok=True)
        procs.append(subprocess.Popen([str(BIN / "amdflow"), "rocket", "--stage", stage, "--campaign", campaign,
                                       "--batch-size", str(batch)], cwd=d, env=env,
                                      stdout=open(d / "log", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"{stage} rocket failed: {(cwd / f'{stage}-0' / 'log').read_text()[-3000:]}")
    return round(time.perf_counter() - start, 1)


def status_json(env: dict[str, str], cwd: Path, camp: Path, log: Path) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "amdflow"), "status", str(camp), "--json"], cwd=cwd, env=env, capture_output=True,
                         text=True, check=True)
    took = time.perf_counter() - start
    log.write_text(out.stdout)
    return json.loads(out.stdout), round(took, 2)


def per_stage(status: dict[str, Any]) -> dict[str, Any]:
    return {stage: {"fireworks": t["launches"], "wall_s": t["wall_s"],
                    "per_s": round(t["launches"] / t["wall_s"], 1) if t["wall_s"] else None}
            for stage, t in status["stage_times"].items()}


def index_check(lp_path: Path, camp: Path) -> dict[str, Any]:
    """Every read of `amdflow status`, `amdflow report` and the API's tables (run in this process) explained: which
    scan a collection."""
    import yaml
    from pymongo import MongoClient

    import amdflow
    from amdflow.campaign import load_campaign
    from amdflow.db import open_db
    from amdflow.ops import campaign_status, write_campaign_report
    from amdflow.settings import get_settings
    from amdflow.testing.query_plans import collection_scans, record_reads

    spec = yaml.safe_load(lp_path.read_text())
    cfg = load_campaign(camp)
    with record_reads(spec["name"]) as reads, open_db(None, get_settings(launchpad_file=lp_path)) as db:
        campaign_status(db, cfg.name)
        write_campaign_report(db, cfg)
    with record_reads(spec["name"]) as api_reads, amdflow.open_campaign(cfg.name, launchpad=lp_path) as c:
        c.thermo()
        c.candidates()
    reads = [*reads, *api_reads]
    client = MongoClient(spec["host"])
    scans = collection_scans(client, reads)
    stats = client[spec["name"]].command("dbStats")
    return {"status_reads": len(reads), "collection_scans": [json.dumps(s["command"], default=str)[:200] for s in scans],
            "db_bytes": int(stats.get("dataSize", 0)) + int(stats.get("indexSize", 0)),
            "db_data_bytes": int(stats.get("dataSize", 0)), "db_index_bytes": int(stats.get("indexSize", 0))}


def api_timings(env: dict[str, str], cwd: Path, camp: Path) -> dict[str, Any]:
    """Seconds of ``open_campaign`` (a new process: imports included), ``thermo()``, ``candidates()`` and ``amdflow show``."""
    code = ("import json, sys, time; t0 = time.perf_counter(); import amdflow; c = amdflow.open_campaign(sys.argv[1]); "
            "t1 = time.perf_counter(); th = c.thermo(); t2 = time.perf_counter(); cs = c.candidates(); t3 = time.perf_counter(); "
            "ok = cs[cs['state'] == 'analyzed']['candidate_id']; "
            "print(json.dumps({'open_s': round(t1 - t0, 2), 'thermo_s': round(t2 - t1, 2), 'thermo_rows': len(th), "
            "'candidates_s': round(t3 - t2, 2), 'candidates': len(cs), 'show_id': (ok.iloc[0] if len(ok) else cs['candidate_id'].iloc[0])}))")
    out = subprocess.run([sys.executable, "-c", code, str(camp)], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    start = time.perf_counter()
    subprocess.run([str(BIN / "amdflow"), "show", str(camp), res.pop("show_id")[:10], "--json"], cwd=cwd, env=env,
                   capture_output=True, text=True, check=True)
    res["show_s"] = round(time.perf_counter() - start, 2)
    return res


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def partial(f: dict[str, Any]) -> None:
    """The figures so far on stderr, stamped: a run of hours that fails late still leaves what it measured."""
    print(json.dumps({"at": datetime.now(UTC).strftime("%H:%M:%S"), "partial": f}, default=str), file=sys.stderr, flush=True)


def wire(n: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    # In memory the server's cache holds the whole database (8.5 kB per candidate with its indexes, more in Python):
    # 1G, its default, fills near 100k candidates.
    uri, server = start_server(cache_size=f"{max(2, -(-n * 80_000 // 10**9))}G", log=folder / "server.log")
    try:
        lp_path = lp_file(uri, folder)
        camp = campaign_file(folder, "wire", n, args.max_sites, args.budget, args.relax_steps)
        env = {**os.environ, "AMDFLOW_LAUNCHPAD_FILE": str(lp_path), "AMDFLOW_PROGRESS": "false", "OMP_NUM_THREADS": "1"}
        f: dict[str, Any] = {}
        add = cli(["add", str(camp)], env, folder, folder / "wire-add.log")
        added = json.loads(add["tail"].strip().splitlines()[-1])
        f["candidates"] = added["new_candidates"]
        f["add"] = {"s": add["s"], "per_s": round(f["candidates"] / add["s"], 1), "peak_rss_mb": add["peak_rss_mb"]}
        partial(f)
        # the test server fetches and sorts every READY match before a claim's limit (7.4 s per claim among 81k READY):
        # a larger batch amortizes that; MongoDB's index scan stops at the limit
        batch = args.predict_batch or (512 if n <= 30_000 else 2048)
        f["predict_batch"] = batch
        f["predict_s"] = rockets("predict", args.rockets, env, folder, "wire", batch)
        partial(f)
        f["dedup_s"] = rockets("dedup", args.rockets, env, folder, "wire", args.dedup_batch)
        partial(f)
        run = cli(["run", str(camp)], env, folder, folder / "wire-run.log")
        f["run_rest_s"] = run["s"]
        partial(f)
        status, f["status_s"] = status_json(env, folder, camp, folder / "wire-status.json")
        report = cli(["report", str(camp)], env, folder, folder / "wire-report.log")
        f["report_s"] = report["s"]
        partial(f)
        f["stages"] = per_stage(status)
        f["candidate_states"] = {k: v for k, v in status["candidates"].items() if v}
        f["fireworks"] = status["fireworks"]
        f["budget"] = status["budget"]
        f.update(index_check(lp_path, camp))
        f["api"] = api_timings(env, folder, camp)
        f["bytes_per_candidate"] = round(f["db_bytes"] / max(f["candidates"], 1))
        if server is not None:
            f["server_peak_rss_mb"] = peak_rss_mb(server.pid)
        return f
    finally:
        if server is not None:
            server.kill()


def embedded(n: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from amdflow.embedded import JOURNAL_FILE, STORE_FILE

    camp = campaign_file(folder, "embedded", n, args.max_sites, args.budget, args.relax_steps)
    env = {k: v for k, v in os.environ.items() if k != "AMDFLOW_LAUNCHPAD_FILE"}
    env.update({"AMDFLOW_PROGRESS": "false", "OMP_NUM_THREADS": "1"})
    store = folder / "embedded"
    f: dict[str, Any] = {}
    start = time.perf_counter()
    add = cli(["add", str(camp)], env, folder, folder / "emb-add.log")
    f["candidates"] = json.loads(add["tail"].strip().splitlines()[-1])["new_candidates"]
    f["add"] = {"s": add["s"], "per_s": round(f["candidates"] / add["s"], 1), "peak_rss_mb": add["peak_rss_mb"]}
    runs = []
    if args.kill_after:
        killed = cli(["run", str(camp)], env, folder, folder / "emb-run-killed.log", kill_after=args.kill_after)
        if killed["killed_at"] is not None:
            last_write = max((store / p).stat().st_mtime for p in (STORE_FILE, JOURNAL_FILE) if (store / p).exists())
            f["kill"] = {"after_s": args.kill_after, "lost_s": round(killed["killed_at"] - last_write, 2),
                         "journal_bytes": (store / JOURNAL_FILE).stat().st_size if (store / JOURNAL_FILE).exists() else 0}
            runs.append(killed["s"])
    run = cli(["run", str(camp)], env, folder, folder / "emb-run.log")
    runs.append(run["s"])
    f["run_s"] = round(sum(runs), 1)
    f["run_peak_rss_mb"] = run["peak_rss_mb"]
    if "kill" in f:
        recovered = [ln for ln in run["tail"].splitlines() if ln.startswith("recovered")]
        f["kill"]["resume_note"] = recovered[0] if recovered else "nothing was left running"
    f["total_s"] = round(time.perf_counter() - start, 1)
    status, f["status_s"] = status_json(env, folder, camp, folder / "emb-status.json")
    report = cli(["report", str(camp)], env, folder, folder / "emb-report.log")
    f["report_s"] = report["s"]
    f["stages"] = per_stage(status)
    f["candidate_states"] = {k: v for k, v in status["candidates"].items() if v}
    f["fireworks"] = status["fireworks"]
    f["store_bytes"] = (store / STORE_FILE).stat().st_size
    f["bytes_per_candidate"] = round(f["store_bytes"] / max(f["candidates"], 1))
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="candidates on the wire server (0: skip)")
    parser.add_argument("--embedded-n", type=int, default=10_000, help="candidates on the embedded store (0: skip)")
    parser.add_argument("--max-sites", type=int, default=12)
    parser.add_argument("--budget", type=int, default=20, help="relax.budget: relaxations with the stand-in engine")
    parser.add_argument("--relax-steps", type=int, default=50)
    parser.add_argument("--rockets", type=int, default=2)
    parser.add_argument("--predict-batch", type=int, default=0, help="0: 512 up to 30k candidates, else 2048")
    parser.add_argument("--dedup-batch", type=int, default=256)
    parser.add_argument("--kill-after", type=float, default=None, help="embedded: SIGKILL the run after this many seconds, then resume")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_campaign_"))
    print(f"working folder: {folder}", file=sys.stderr)
    figures: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(),
                               "max_sites": args.max_sites, "budget": args.budget, "relax_steps": args.relax_steps}
    try:
        if args.embedded_n:
            figures["embedded"] = embedded(args.embedded_n, args, folder)
            print(json.dumps({"embedded": figures["embedded"]}), file=sys.stderr)
        if args.n:
            figures["wire"] = wire(args.n, args, folder)
            print(json.dumps({"wire": figures["wire"]}), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.write:
        write_markdown(figures)
    summary = {"date": figures["date"]}
    if "embedded" in figures:
        e = figures["embedded"]
        summary.update(embedded_candidates=e["candidates"], embedded_10k_s=e["total_s"], embedded_add_peak_rss_mb=e["add"]["peak_rss_mb"],
                       embedded_status_s=e["status_s"], embedded_bytes_per_candidate=e["bytes_per_candidate"],
                       embedded_kill_lost_s=(e.get("kill") or {}).get("lost_s"))
    if "wire" in figures:
        w = figures["wire"]
        summary.update(wire_candidates=w["candidates"], wire_add_s=w["add"]["s"], wire_add_peak_rss_mb=w["add"]["peak_rss_mb"],
                       wire_predict_s=w["predict_s"], wire_dedup_s=w["dedup_s"], wire_run_rest_s=w["run_rest_s"],
                       wire_status_s=w["status_s"], wire_report_s=w["report_s"], wire_bytes_per_candidate=w["bytes_per_candidate"],
                       wire_collection_scans=len(w["collection_scans"]),
                       wire_server_peak_rss_mb=w.get("server_peak_rss_mb"))
    print(json.dumps(summary))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def projection(w: dict[str, Any], n: int = 1_000_000) -> str:
    """1M candidates from the measured per-candidate costs (each stage grows linearly in its own count here: the
    dedup's fits per family, not per formula, and every other stage per document)."""
    scale = n / w["candidates"]
    rows = [("add", w["add"]["s"]), ("predict", w["predict_s"]), ("dedup", w["dedup_s"]), ("relax + hull (`amdflow run`)", w["run_rest_s"])]
    total = sum(t for _, t in rows) * scale
    worst = max(rows, key=lambda r: r[1])
    body = "; ".join(f"{k} {t * scale / 3600:.1f} h" for k, t in rows)
    return (f"- Projection to {n:,} candidates of one system on this server and these 2 cores, linear in the measured "
            f"costs: {body}; about {total / 3600:.0f} h in all, {w['bytes_per_candidate'] * n / 1e9:.1f} GB of database. "
            f"The limit is the {worst[0]} stage. The test server spends 0.2-0.7 ms per document (LaunchPad section); "
            "MongoDB's bulk writes take tens of microseconds per document (not measured here: none can run on this "
            "machine), which would leave the dedup's StructureMatcher fits and CGCNN's inference the larger part; the "
            "dedup's fits parallelize over buckets across CPU rockets, the predictions over GPU rockets.\n")


def write_markdown(f: dict[str, Any]) -> None:
    def stages(s: dict[str, Any]) -> str:
        return "; ".join(f"{k} {v['fireworks']:,} in {v['wall_s']} s ({v['per_s']}/s)" for k, v in s.items())

    parts = [f"## A campaign at scale (`scripts/bench_campaign.py`, {f['date']})\n",
             f"Machine: {f['machine']}, no GPU. Ce-Fe-In on every AFLOW prototype of at most {f['max_sites']} sites at as many "
             "lattice scales as the size needs; exa-AMD's screen (CGCNN threshold 0.0, no funnel); relax: CHGNet at most "
             f"{f['relax_steps']} steps under a budget of {f['budget']} (the stand-in for DFT: the rest wait as over_budget).\n"]
    if "embedded" in f:
        e = f["embedded"]
        parts.append(f"""### Embedded store (`amdflow add` + `amdflow run`, one process, as on a laptop)

- {e['candidates']:,} candidates: **{e['total_s']} s** end to end (add {e['add']['s']} s, peak RSS {e['add']['peak_rss_mb']} MB;
  run {e['run_s']} s, peak RSS {e['run_peak_rss_mb']} MB).
- Stages (from the launches): {stages(e['stages'])}.
- Candidates: {e['candidate_states']}. `amdflow status`: {e['status_s']} s; `amdflow report`: {e['report_s']} s.
- Store: {e['store_bytes'] / 1e6:.1f} MB, {e['bytes_per_candidate']:,} bytes per candidate (snapshot, BSON as extended JSON).
""")
        if e.get("kill"):
            k = e["kill"]
            parts.append(f"- kill -9 after {k['after_s']} s: the last flush had reached the disk {k['lost_s']} s before the kill (the "
                         f"work lost, redone on resume; journal {k['journal_bytes']:,} bytes then); on resume: {k['resume_note']}.\n")
    if "wire" in f:
        w = f["wire"]
        parts.append(f"""### MongoDB-wire test server (2 rockets per batched stage, then `amdflow run`)

- {w['candidates']:,} candidates. `amdflow add`: {w['add']['s']} s ({w['add']['per_s']}/s), **peak RSS {w['add']['peak_rss_mb']} MB**.
- Predict (2 batched rockets, batch {w.get('predict_batch')}): {w['predict_s']} s; dedup (2 batched rockets): {w['dedup_s']} s; references, relaxations and hull
  (`amdflow run`): {w['run_rest_s']} s.
- Stages (from the launches): {stages(w['stages'])}.
- Candidates: {w['candidate_states']}; budget {w['budget']}.
- `amdflow status`: {w['status_s']} s; `amdflow report`: {w['report_s']} s. Their reads and the API's tables,
  explained: {w['status_reads']} reads, collection scans: {len(w['collection_scans'])} {w['collection_scans'] or ''}.
- Database: {w['db_bytes'] / 1e6:.1f} MB ({w['db_data_bytes'] / 1e6:.1f} MB documents, {w['db_index_bytes'] / 1e6:.1f} MB
  indexes): **{w['bytes_per_candidate']:,} bytes per candidate** with its Fireworks and launches; the test server's peak
  RSS {w.get('server_peak_rss_mb')} MB (it holds every document as Python objects).
""")
        if w.get("api"):
            a = w["api"]
            parts.append(f"- Results in Python at this size: `open_campaign` {a['open_s']} s (a new process, imports included), "
                         f"`.thermo()` {a['thermo_s']} s ({a['thermo_rows']:,} rows), `.candidates()` {a['candidates_s']} s "
                         f"({a['candidates']:,} rows); `amdflow show` of an analyzed candidate {a['show_s']} s.\n")
        parts.append(projection(w))
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    if "embedded" not in f:  # a wire-only run keeps the embedded store's figures already written
        old = _subsection(text, "### Embedded store")
        if old:
            parts.insert(2, old)
    section = "\n".join(parts)
    start = text.find("## A campaign at scale (")
    if start < 0:
        path.write_text(text.rstrip() + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    path.write_text(text[:start] + section + (text[end + 1:] if end >= 0 else ""))


def _subsection(text: str, heading: str) -> str:
    """The ``### heading`` subsection of this benchmark's section in BENCHMARKS.md ('' if absent)."""
    section = text.find("## A campaign at scale (")
    start = text.find(heading, section) if section >= 0 else -1
    if start < 0:
        return ""
    ends = [e for e in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if e >= 0]
    return text[start:min(ends)].rstrip() + "\n" if ends else text[start:].rstrip() + "\n"


if __name__ == "__main__":
    main()
