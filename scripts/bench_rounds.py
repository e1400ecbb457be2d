"""Rounds benchmark: does spending a DFT budget in rounds, retraining CGCNN between them, find more stable crystals
than one ranking made before any DFT result? A simulated campaign on the MP perovskites.

Pool: a seeded sample of ``--pool`` materials of ``../shared/datasets/mp_perovskites_pml`` (stratified by
stability, as ``bench_discovery.py`` samples). Each material is a candidate the way amdflow makes it: its
composition decorated on the ideal prototype of its space group by amdflow's generator, unrelaxed (the lowest
CGCNN prediction over its decorations is its score). "DFT" of a chosen material is its Materials Project label: its
relaxed structure and formation energy (the training example a campaign's hull would give) and whether it is
stable (``energy_above_hull <= 0``: a hit).

Score: the MP-anchored predicted energy above hull (``E_hull_MP + E_f_pred - E_f_MP``, Matbench Discovery's
convention; ranking by raw E_f across unrelated systems is worse than random here, see BENCHMARKS.md). Both arms
use it, so the only difference between them is the retraining.

* one ranking: the pretrained CGCNN ranks the pool once; the best ``--budget`` are "relaxed".
* rounds: ``--rounds`` rounds of budget/rounds; after each, CGCNN is fine-tuned (amdflow's own ``train``, from the
  checkpoint in use, early stopping on a held-out tenth) on every material "relaxed" so far and re-ranks the rest;
  as the campaign does, the fine-tuned model is used only when it beats the one in use on that held-out part.

Seeds: each seed draws its own pool and its own training split; figures are per seed, with the mean and a 95 %
bootstrap interval over seeds of the difference (rounds minus one ranking) and of the ratio. A random order's
expectation is given too.

``--retrain potential``: the funnel's SevenNet ranks instead (relaxations from ``bench_discovery.py``'s cache) and the
rounds fine-tune it with amdflow's own fine-tuning (:func:`run_seed_potential` says how); each seed draws ``--pool``
materials of that benchmark's sample.

    python scripts/bench_rounds.py [--pool 600] [--budget 120] [--rounds 4] [--seeds 5] [--epochs 60] [--json]
    python scripts/bench_rounds.py --retrain potential --pool 240 --budget 48 --rounds 3 --seeds 5 --cache FILE

JSON keys: ``hits_one_shot``, ``hits_rounds`` (means over seeds, with ``*_per_seed``; ``hits_rounds_ungated``: the same
rounds using every fine-tuned model whether or not it beat the one in use), ``rounds_over_one_shot``
(ratio of the means) with ``rounds_minus_one_shot_ci95`` and ``rounds_over_one_shot_ci95`` (bootstrap over seeds),
``hits_random_expected``, per round the hit rate of each arm, and the fine-tuned models' held-out MAE against the
pretrained one's.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
warnings.filterwarnings("ignore")

import bench_discovery as disc  # noqa: E402
from bench_screen import machine  # noqa: E402


def mp_structures(ids: list[str]) -> dict[str, Any]:
    from validate_formation import structures

    return structures(ids)


def predict(checkpoint: Any, decorations: dict[str, list[Any]], ids: list[str]) -> dict[str, float]:
    """Lowest CGCNN E_f over each material's decorations."""
    from amdflow.screen.predict import CGCNNPredictor

    predictor = CGCNNPredictor(checkpoint)
    flat = [(i, s) for i in ids for s in decorations[i]]
    values = predictor.predict([s for _, s in flat])
    out: dict[str, float] = {}
    for (i, _), v in zip(flat, values, strict=True):
        out[i] = min(out.get(i, math.inf), float(v))
    return out


def fine_tune(parent: Any, chosen: list[str], truth_structs: dict[str, Any], e_f: dict[str, float], epochs: int,
              patience: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """CGCNN fine-tuned on the chosen materials' MP structures and formation energies (amdflow's own train), and
    whether it beats ``parent`` on the held-out tenth (the campaign's adoption rule)."""
    from amdflow.screen.checkpoint import load_checkpoint
    from amdflow.screen.predict import iter_graphs
    from amdflow.screen.train import TrainSettings, data_hash, save_checkpoint, train

    graphs = list(iter_graphs([truth_structs[i] for i in chosen], 1))
    keep = [k for k, g in enumerate(graphs) if not isinstance(g, str)]
    ids = [chosen[k] for k in keep]
    targets = [e_f[i] for i in ids]
    settings = TrainSettings(epochs=epochs, patience=patience, seed=seed)
    result = train([graphs[k] for k in keep], targets, parent, settings)
    folder = Path(tempfile.mkdtemp(prefix="bench_rounds_"))
    path, _ = save_checkpoint(result, folder / "round.pth.tar", settings, parent, ids,
                              data_hash(ids, targets, [graphs[k] for k in keep]), "bench_rounds")
    before, after = result.metrics.get("parent_val_mae"), result.metrics["val_mae"]
    return load_checkpoint(str(path)), {"n": len(ids), "val_mae": round(after, 4),
                                        "pretrained_val_mae": None if before is None else round(before, 4),
                                        "adopted": before is None or after < before}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from amdflow.screen.checkpoint import load_checkpoint

    mats = disc.materials(args.pool, seed)
    folder = Path(tempfile.mkdtemp(prefix="bench_rounds_gen_"))
    decorations = {m["material_id"]: [s for _, s in disc.candidates(m, (1.0,), folder)] for m in mats}
    mats = [m for m in mats if decorations[m["material_id"]]]
    ids = [m["material_id"] for m in mats]
    stable = {m["material_id"]: m["e_hull"] <= 0 for m in mats}
    e_hull = {m["material_id"]: m["e_hull"] for m in mats}
    e_f = {m["material_id"]: m["e_f"] for m in mats}
    truth_structs = mp_structures(ids)
    pretrained = load_checkpoint("formation-energy-per-atom")

    def score(pred: dict[str, float], pool: list[str]) -> list[str]:  # best first
        return sorted(pool, key=lambda i: (e_hull[i] + pred[i] - e_f[i], i))

    base = predict(pretrained, decorations, ids)
    one_shot = score(base, ids)[: args.budget]
    per_round = args.budget // args.rounds

    def arm(gated: bool) -> tuple[list[str], list[int], list[dict[str, Any]]]:
        """Rounds with retraining: ``gated`` uses a fine-tuned model only when it beats the one in use (the campaign's
        rule); ungated always uses it."""
        chosen: list[str] = []
        model, trained, pred, hits = pretrained, [], base, []
        for k in range(args.rounds):
            taken = set(chosen)
            size = per_round if k < args.rounds - 1 else args.budget - len(chosen)
            picked = score(pred, [i for i in ids if i not in taken])[:size]
            chosen += picked
            hits.append(sum(stable[i] for i in picked))
            if k == args.rounds - 1:
                break
            candidate, info = fine_tune(model, chosen, truth_structs, e_f, args.epochs, args.patience, seed * 100 + k)
            trained.append(info)
            if info["adopted"] or not gated:
                model = candidate
                pred = predict(model, decorations, [i for i in ids if i not in set(chosen)]) | {i: pred[i] for i in chosen}
        return chosen, hits, trained

    chosen, round_hits, trained = arm(True)
    free, free_hits, free_trained = arm(False)
    one_shot_rounds = [sum(stable[i] for i in one_shot[k * per_round:(k + 1) * per_round if k < args.rounds - 1 else None])
                       for k in range(args.rounds)]
    return {"seed": seed, "pool": len(ids), "stable_in_pool": sum(stable.values()), "budget": args.budget,
            "hits_one_shot": sum(stable[i] for i in one_shot), "hits_rounds": sum(stable[i] for i in chosen),
            "hits_rounds_ungated": sum(stable[i] for i in free), "hits_per_round_rounds": round_hits,
            "hits_per_round_ungated": free_hits, "hits_per_round_one_shot": one_shot_rounds,
            "hits_random_expected": round(args.budget * sum(stable.values()) / len(ids), 2), "fine_tuning": trained,
            "fine_tuning_ungated": free_trained}


# ---------------------------------------------------------------- retrain: potential
def label_energy(structure: Any, e_f: float, refs: dict[str, float]) -> float | None:
    """The uncorrected total energy (eV) whose MP2020-corrected formation energy against MP's references is ``e_f``:
    the label SevenNet-0's scale (uncorrected PBE(+U), MPtrj) needs. MP2020's terms depend on the composition only, so
    E_f is linear in the energy: E_f(E) = E_f(0) + E/n."""
    at_zero = disc.mp2020_formation_energy(structure, 0.0, refs, True)
    return None if at_zero is None else len(structure) * (e_f - at_zero)


@functools.lru_cache(maxsize=2)
def _calculator(checkpoint: str) -> Any:
    import contextlib
    import io

    from sevenn.calculator import SevenNetCalculator

    with contextlib.redirect_stdout(io.StringIO()):
        return SevenNetCalculator(model=checkpoint, device="cpu")


def single_points(checkpoint: str, structures: list[Any]) -> list[float]:
    """Total energies (eV) of a SevenNet checkpoint at fixed structures (sevenn's ASE calculator)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    calc = _calculator(checkpoint)
    out = []
    for s in structures:
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.calc = calc
        out.append(float(atoms.get_potential_energy()))
    return out


def pool_mae(checkpoint: str, ids: list[str], truth_structs: dict[str, Any], info: dict[str, Any],
             refs: dict[str, float]) -> float:
    """MAE (eV/atom) of a SevenNet checkpoint's formation energy against MP's, at MP's structures of ``ids``."""
    structs = [truth_structs[i] for i in ids]
    errors = []
    for i, s, e in zip(ids, structs, single_points(checkpoint, structs), strict=True):
        pred = disc.mp2020_formation_energy(s, e, refs, True)
        if pred is not None:
            errors.append(abs(pred - info[i]["e_f"]))
    return round(sum(errors) / max(len(errors), 1), 4)


def run_seed_potential(args: argparse.Namespace, seed: int, base: list[dict[str, Any]], cache: Any, engine: Any,
                       refs: dict[str, float], truth_structs: dict[str, Any]) -> dict[str, Any]:
    """The funnel's ranking (SevenNet-0 relaxations, MP-anchored predicted E_above_hull) spent at once, against rounds
    that fine-tune SevenNet on the "DFT" labels of what they chose (MP's relaxed structure and its energy on
    SevenNet-0's scale; forces and stresses zero, MP's cell being relaxed) with amdflow's own fine-tuning
    (:func:`amdflow.relax.finetune.finetune_sevennet`, adopted only when it beats the potential in use on the held-out
    tenth). An adopted potential re-ranks the rest by its energies at the structures SevenNet-0 relaxed (single
    points: the campaign relaxes the waiting pool again; this benchmark cannot afford that on 2 cores)."""
    import random

    from amdflow.relax.finetune import FineTuneSettings, finetune_sevennet

    mats = sorted(random.Random(seed).sample(base, min(args.pool, len(base))), key=lambda m: m["material_id"])
    folder = Path(tempfile.mkdtemp(prefix="bench_rounds_gen_"))
    decorations = {m["material_id"]: [s for _, s in disc.candidates(m, (1.0,), folder)] for m in mats}
    relaxed: dict[str, list[tuple[Any, float]]] = {}  # per material: (SevenNet-0's relaxed cell, its energy)
    for mid, cells in decorations.items():
        rs = [r for r in (cache.result(engine, s) for s in cells) if r is not None]
        relaxed[mid] = [(r.final_structure, r.energy) for r in rs
                        if disc.mp2020_formation_energy(r.final_structure, r.energy, refs, True) is not None]
    ids = [m["material_id"] for m in mats if relaxed.get(m["material_id"])]
    info = {m["material_id"]: m for m in mats}
    stable = {i: info[i]["e_hull"] <= 0 for i in ids}

    def predict(checkpoint: str | None, which: list[str]) -> dict[str, float]:
        """Lowest predicted E_f over each material's relaxed cells: SevenNet-0's energies, or a checkpoint's at them."""
        out: dict[str, float] = {}
        for i in which:
            cells = [c for c, _ in relaxed[i]]
            energies = [e for _, e in relaxed[i]] if checkpoint is None else single_points(checkpoint, cells)
            out[i] = min(disc.mp2020_formation_energy(c, e, refs, True) for c, e in zip(cells, energies, strict=True))
        return out

    def score(pred: dict[str, float], pool: list[str]) -> list[str]:
        return sorted(pool, key=lambda i: (info[i]["e_hull"] + pred[i] - info[i]["e_f"], i))

    base_pred = predict(None, ids)
    one_shot = score(base_pred, ids)[: args.budget]
    per_round = args.budget // args.rounds
    chosen: list[str] = []
    pred, in_use, hits, trained = base_pred, "7net-0", [], []
    out_dir = Path(tempfile.mkdtemp(prefix="bench_rounds_7net_"))
    for k in range(args.rounds):
        size = per_round if k < args.rounds - 1 else args.budget - len(chosen)
        picked = score(pred, [i for i in ids if i not in set(chosen)])[:size]
        chosen += picked
        hits.append(sum(stable[i] for i in picked))
        if k == args.rounds - 1:
            break
        frames, groups = [], []
        for i in chosen:
            s = truth_structs[i]
            e = label_energy(s, info[i]["e_f"], refs)
            if e is not None:
                frames.append({"structure": s.as_dict(), "energy": e, "forces": [[0.0, 0.0, 0.0]] * len(s),
                               "stress": [[0.0] * 3] * 3})
                groups.append(i)
        start = time.perf_counter()
        result = finetune_sevennet(frames, groups, in_use, out_dir / f"seed{seed}-round{k + 1}.pth",
                                   FineTuneSettings(epochs=args.potential_epochs, lr=args.potential_lr, seed=seed * 100 + k))
        row = {"n": len(frames), "val_energy_mae": round(result.val_energy_mae, 4),
               "in_use_val_energy_mae": round(result.parent_val_energy_mae, 4), "adopted": result.better,
               "seconds": round(time.perf_counter() - start, 1)}
        # the direct test of the fine-tuning: the E_f error on the materials not chosen yet, at MP's structures
        rest = [i for i in ids if i not in set(chosen)]
        row["pool_mae_ef_in_use"], row["pool_mae_ef_tuned"] = (
            pool_mae(c, rest, truth_structs, info, refs) for c in (in_use, str(result.checkpoint)))
        if result.better:
            in_use = str(result.checkpoint)
            start = time.perf_counter()
            pred = pred | predict(in_use, rest)
            row["rerank_seconds"] = round(time.perf_counter() - start, 1)
        trained.append(row)
        print(json.dumps({"seed": seed, "round": k + 1, **row}), file=sys.stderr, flush=True)
    one_shot_rounds = [sum(stable[i] for i in one_shot[k * per_round:(k + 1) * per_round if k < args.rounds - 1 else None])
                       for k in range(args.rounds)]
    return {"seed": seed, "pool": len(ids), "stable_in_pool": sum(stable.values()), "budget": args.budget,
            "hits_one_shot": sum(stable[i] for i in one_shot), "hits_rounds": sum(stable[i] for i in chosen),
            "hits_per_round_rounds": hits, "hits_per_round_one_shot": one_shot_rounds,
            "hits_random_expected": round(args.budget * sum(stable.values()) / len(ids), 2), "fine_tuning": trained}


def main_potential(args: argparse.Namespace) -> dict[str, Any]:
    """--retrain potential: the pool is drawn per seed from bench_discovery.py's sample (its SevenNet-0 relaxations are
    read from its cache; missing ones are relaxed and added)."""
    base = disc.materials(args.discovery_sample, args.discovery_seed)
    cache = disc.RelaxCache(args.cache)
    engine = disc.funnel_engine("sevennet", 300)
    folder = Path(tempfile.mkdtemp(prefix="bench_rounds_all_"))
    every = [s for m in base for _, s in disc.candidates(m, (1.0,), folder)]
    cache.relax(engine, every, 1, 96, "sevennet (not cached)")
    refs = disc.elemental_refs()
    truth_structs = mp_structures([m["material_id"] for m in base])
    rows = []
    for seed in range(args.seeds):
        rows.append(run_seed_potential(args, seed, base, cache, engine, refs, truth_structs))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "fine_tuning"}), file=sys.stderr, flush=True)
    return {"rows": rows, "cache": {"path": str(args.cache), "hits": cache.hits, "new": cache.new},
            "model": disc.model_version(engine)}


def bootstrap_mean(values: list[float], n: int = 5000, seed: int = 0) -> list[float]:
    import numpy as np

    a = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(n, len(a)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 3), round(float(np.percentile(means, 97.5)), 3)]


def bootstrap_ratio(a: list[float], b: list[float], n: int = 5000, seed: int = 0) -> list[float]:
    import numpy as np

    x, y = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n, len(x)))
    ratios = x[idx].mean(axis=1) / np.maximum(y[idx].mean(axis=1), 1e-12)
    return [round(float(np.percentile(ratios, 2.5)), 3), round(float(np.percentile(ratios, 97.5)), 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=600, help="materials in each seed's pool")
    parser.add_argument("--budget", type=int, default=120, help="'DFT' relaxations per arm")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--retrain", choices=["cgcnn", "potential"], default="cgcnn",
                        help="the model the rounds fine-tune: CGCNN ranks (default), or the funnel's SevenNet ranks")
    parser.add_argument("--potential-epochs", type=int, default=20)
    parser.add_argument("--potential-lr", type=float, default=1e-4)
    parser.add_argument("--discovery-sample", type=int, default=300, help="--retrain potential: bench_discovery.py's sample")
    parser.add_argument("--discovery-seed", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "amdflow_bench_discovery_cache.json",
                        help="--retrain potential: bench_discovery.py's relaxation cache")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    if not (disc.DATA / "mp_perovskites_summary.csv").exists():
        raise SystemExit(f"needs {disc.DATA} (../shared reference data)")
    if args.budget < args.rounds:
        raise SystemExit("--budget must be at least --rounds (one relaxation per round)")
    start = time.perf_counter()
    if args.retrain == "potential":
        pot = main_potential(args)
        rows = pot["rows"]
        one = [r["hits_one_shot"] for r in rows]
        rnd = [r["hits_rounds"] for r in rows]
        out = {
            "date": time.strftime("%Y-%m-%d"), "machine": machine(), "retrain": "potential", "pool": args.pool,
            "budget": args.budget, "rounds": args.rounds, "seeds": args.seeds, "potential_epochs": args.potential_epochs,
            "potential_lr": args.potential_lr, "model": pot["model"], "cache": pot["cache"],
            "discovery_sample": args.discovery_sample, "discovery_seed": args.discovery_seed,
            "score": "MP-anchored predicted E_above_hull from SevenNet relaxations (single points after fine-tuning)",
            "hits_one_shot": round(statistics.mean(one), 2), "hits_rounds": round(statistics.mean(rnd), 2),
            "hits_one_shot_per_seed": one, "hits_rounds_per_seed": rnd,
            "rounds_over_one_shot": round(statistics.mean(rnd) / max(statistics.mean(one), 1e-12), 3),
            "rounds_minus_one_shot_ci95": bootstrap_mean([a - b for a, b in zip(rnd, one, strict=True)]),
            "rounds_over_one_shot_ci95": bootstrap_ratio(rnd, one),
            "hits_random_expected": round(statistics.mean(r["hits_random_expected"] for r in rows), 2),
            "adopted_models": sum(t["adopted"] for r in rows for t in r["fine_tuning"]),
            "fine_tunings": sum(len(r["fine_tuning"]) for r in rows), "per_seed": rows,
            "seconds": round(time.perf_counter() - start, 1)}
        if not args.json:
            print(f"one ranking {out['hits_one_shot']} hits, rounds {out['hits_rounds']} (x{out['rounds_over_one_shot']} "
                  f"{out['rounds_over_one_shot_ci95']}), random {out['hits_random_expected']}", file=sys.stderr)
        print(json.dumps(out))
        return
    rows = []
    for seed in range(args.seeds):
        rows.append(run_seed(args, seed))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    one = [r["hits_one_shot"] for r in rows]
    rnd = [r["hits_rounds"] for r in rows]
    free = [r["hits_rounds_ungated"] for r in rows]
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "pool": args.pool, "budget": args.budget,
        "rounds": args.rounds, "seeds": args.seeds, "epochs": args.epochs, "patience": args.patience,
        "retrain": "cgcnn (fine-tuned from the checkpoint in use on every material relaxed so far; adopted when it beats it on held-out materials)",
        "score": "MP-anchored predicted E_above_hull", "hits_one_shot": round(statistics.mean(one), 2),
        "hits_rounds": round(statistics.mean(rnd), 2), "hits_one_shot_per_seed": one, "hits_rounds_per_seed": rnd,
        "rounds_over_one_shot": round(statistics.mean(rnd) / max(statistics.mean(one), 1e-12), 3),
        "rounds_minus_one_shot_ci95": bootstrap_mean([a - b for a, b in zip(rnd, one, strict=True)]),
        "rounds_over_one_shot_ci95": bootstrap_ratio(rnd, one),
        "hits_rounds_ungated": round(statistics.mean(free), 2), "hits_rounds_ungated_per_seed": free,
        "ungated_minus_one_shot_ci95": bootstrap_mean([a - b for a, b in zip(free, one, strict=True)]),
        "hits_random_expected": round(statistics.mean(r["hits_random_expected"] for r in rows), 2),
        "adopted_models": sum(t["adopted"] for r in rows for t in r["fine_tuning"]),
        "fine_tunings": sum(len(r["fine_tuning"]) for r in rows), "per_seed": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if not args.json:
        print(f"one ranking {out['hits_one_shot']} hits, rounds {out['hits_rounds']} (x{out['rounds_over_one_shot']} "
              f"{out['rounds_over_one_shot_ci95']}), random {out['hits_random_expected']}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
