"""Run the fault tests (marker ``fault``) several times in a row and sum their figures.

    python scripts/repeat_faults.py [--runs 3] [--write docs/errors.md]

A fault test that passes once may pass by luck (a kill that landed in a quiet moment); the
issue asks for three passes in a row. Each run is a fresh ``pytest -m fault`` (own wire
server, own temporary folders); the script stops at the first failing run and exits 1.
The figures (results lost, duplicated) come from the tests themselves
(``tests/conftest.py::record_figures``). ``--write`` replaces the "Repeated runs" section
of the given Markdown file with the table, the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Repeated runs of the fault tests"


def run_once(workers: int) -> tuple[int, float, list[dict], str]:
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "AMDFLOW_FAULT_FIGURES": str(figures)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "fault", "-n", str(workers), "-p", "no:cacheprovider"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
    return proc.returncode, wall, rows, tail[0] if proc.returncode == 0 else proc.stdout[-4000:]


def table(results: list[tuple[int, float, list[dict], str]]) -> str:
    lines = ["| run | pytest | wall (s) | case | Fireworks | lost | duplicated |", "|---|---|---|---|---|---|---|"]
    for i, (rc, wall, rows, summary) in enumerate(results, 1):
        for j, row in enumerate(sorted(rows, key=lambda r: r["case"])):
            head = f"| {i} | {summary if rc == 0 else 'FAILED'} | {wall:.0f} " if j == 0 else "| | | "
            lines.append(f"{head}| {row['case']} | {row.get('fireworks', '')} | {row['lost']} | {row['duplicated']} |")
        if not rows:
            lines.append(f"| {i} | {summary if rc == 0 else 'FAILED'} | {wall:.0f} | (no figures) | | | |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text()
    block = f"{SECTION}\n\n{body}\n"
    if SECTION in text:
        text = re.sub(re.escape(SECTION) + r"\n.*?(?=\n## |\Z)", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers per run")
    parser.add_argument("--write", type=Path, help="Markdown file whose 'Repeated runs' section gets the table")
    args = parser.parse_args()
    results = []
    for i in range(args.runs):
        rc, wall, rows, summary = run_once(args.workers)
        results.append((rc, wall, rows, summary))
        bad = [r for r in rows if r["lost"] or r["duplicated"]]
        print(f"run {i + 1}/{args.runs}: {'passed' if rc == 0 else 'FAILED'} in {wall:.0f} s; "
              f"{len(rows)} figure rows, lost {sum(r['lost'] for r in rows)}, duplicated {sum(r['duplicated'] for r in rows)}", flush=True)
        if rc != 0 or bad:
            print(summary)
            break
    ok = len(results) == args.runs and all(rc == 0 for rc, *_ in results)
    body = (f"{table(results)}\n\n{'All' if ok else 'NOT all'} {args.runs} runs in a row passed. Machine: {platform.node()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
            f"`python scripts/repeat_faults.py --runs {args.runs}` (`make faults`).")
    print(body)
    if args.write:
        write_section(args.write, body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
