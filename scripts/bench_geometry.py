"""Candidate geometry: the volume rule alone, the bond-length floor, and pymatgen's DLS volume predictor (issue 26).

Every ordered AFLOW prototype of up to --max-sites sites is decorated with each target system's elements three ways:

* ``volume rule``: exa-AMD's (summed elemental volumes; ``generate.min_bond_ratio: 0``);
* ``floor``: amdflow's default (the larger of the volume rule's volume and the one that puts the shortest bond at
  0.75x the summed covalent radii; decorations needing more than 3x the volume skipped);
* ``DLS``: the volume-rule cell rescaled by pymatgen's ``DLSVolumePredictor`` (data-mined bond lengths; the shortest
  bond set to its expected length, up or down, bounded to 0.5-1.5x the input volume, pymatgen's defaults), and
  ``DLS unbounded`` (no bounds).

The ``seconds`` of a mode are after a warm-up generation (the AFLOW library read once); DLS's include generating the
volume-rule cells it starts from.

Per system and mode: candidates, skipped, the share whose shortest bond is below 0.75x / 0.85x, CGCNN's screen-outs
(threshold: predicted E_f > 1.0 eV/atom; top_k: not among the 3 lowest of its formula, the default screen), and the
seconds spent. With ``--funnel``, a seeded sample of --sample decorations (the same ones in every mode) is relaxed
with the funnel's SevenNet-0 settings: failures (guard trips), steps, converged, and how far the starting volume is
from the relaxed one (median |V0/V - 1|, with a 95 % bootstrap interval).

    python scripts/bench_geometry.py [--systems Ce-Fe-In Ce-Fe-C Na-Cl-Mg] [--max-sites 12] [--funnel --sample 20]
    python scripts/bench_geometry.py --perovskites [--perovskite-sample 200] [--funnel]

``--perovskites``: the same comparison (volume rule against the floor) on ``scripts/bench_discovery.py``'s candidates
(its seed 7 sample), scored as it scores them: stable materials in the top 20 % by CGCNN and by SevenNet-0.

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

MODES = ("volume rule", "floor", "DLS", "DLS unbounded")


def _key(doc: dict[str, Any]) -> tuple:
    return doc["template"]["template_id"], doc.get("lattice_scale", 1.0), tuple(sorted(doc["substitution"].items()))


def generate(system: str, mode: str, max_sites: int) -> tuple[dict[tuple, Any], dict[str, Any]]:
    """Decorations of ``system`` in ``mode``: {decoration key: Structure}, and the generation figures."""
    from pymatgen.core import Structure

    from amdflow.campaign import campaign_from_dict
    from amdflow.generate import generate_candidates
    from amdflow.generate.substitute import GenerateReport
    from amdflow.generate.volume import min_bond_ratio

    gen: dict[str, Any] = {"include_subsystems": False} | ({} if mode == "floor" else {"min_bond_ratio": 0.0})
    cfg = campaign_from_dict({"name": "geometry", "elements": system.split("-"), "generate": gen,
                              "templates": [{"source": "aflow", "max_sites": max_sites}]})
    report = GenerateReport()
    start = time.perf_counter()
    docs = list(generate_candidates(cfg, report, workers=1))
    structures = {_key(d): Structure.from_dict(d["structure"]) for d in docs}
    if mode.startswith("DLS"):
        from pymatgen.analysis.structure_prediction.volume_predictor import DLSVolumePredictor

        dls = DLSVolumePredictor() if mode == "DLS" else DLSVolumePredictor(min_scaling=None, max_scaling=None)
        structures = {k: dls.get_predicted_structure(s) for k, s in structures.items()}
    seconds = time.perf_counter() - start
    ratios = {k: min_bond_ratio(s) for k, s in structures.items()}
    return structures, {"system": system, "mode": mode, "candidates": len(structures), "seconds": round(seconds, 3),
                        "skipped": dict(report.stats.filtered), "ratios": ratios}


def screen(structures: dict[tuple, Any], ratios: dict[tuple, float], top_k: int = 3, cut: float = 1.0) -> dict[str, Any]:
    """CGCNN's screen-outs, threshold and top_k (of them, how many start below 0.75x), and the top_k keepers."""
    from amdflow.screen.predict import get_predictor

    keys = list(structures)
    ef = dict(zip(keys, (float(v) for v in get_predictor().predict([structures[k] for k in keys])), strict=True))
    by_formula: dict[str, list[tuple]] = {}
    for k in keys:
        by_formula.setdefault(structures[k].composition.reduced_formula, []).append(k)
    kept = {k for ks in by_formula.values() for k in sorted(ks, key=ef.__getitem__)[:top_k]}
    out = [k for k in keys if k not in kept]
    return {"threshold_out": sum(e > cut for e in ef.values()),
            "threshold_out_below_0.75": sum(ef[k] > cut and ratios[k] < 0.75 for k in keys),
            "top_k_out": len(out), "top_k_out_below_0.75": sum(ratios[k] < 0.75 for k in out),
            "top_k_kept_below_0.75": sum(ratios[k] < 0.75 for k in kept), "kept": kept}


def bootstrap_median(values: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    a = np.asarray(values, float)
    meds = np.median(a[rng.integers(0, len(a), size=(n, len(a)))], axis=1)
    return [round(float(np.percentile(meds, 2.5)), 3), round(float(np.percentile(meds, 97.5)), 3)]


def funnel(structures: dict[tuple, Any], keys: list[tuple], max_steps: int) -> dict[str, Any]:
    """Relax ``keys`` (those this mode has) with the funnel's SevenNet-0: failures, steps, volume change."""
    from amdflow.campaign import FunnelConfig
    from amdflow.relax import get_funnel_engine

    have = [k for k in keys if k in structures]
    engine = get_funnel_engine(FunnelConfig(engine="sevennet", max_steps=max_steps))
    start = time.perf_counter()
    results = engine.relax_many([structures[k] for k in have], 1)
    seconds = time.perf_counter() - start
    ok = [(k, r) for k, r in zip(have, results, strict=True) if not isinstance(r, BaseException)]
    dv = [abs(structures[k].volume / r.final_structure.volume - 1) for k, r in ok]
    return {"relaxed": len(have), "not_generated": len(keys) - len(have), "failed": len(have) - len(ok),
            "converged": sum(r.converged for _, r in ok), "mean_steps": round(sum(r.n_steps for _, r in ok) / max(len(ok), 1), 1),
            "median_volume_error": round(sorted(dv)[len(dv) // 2], 3) if dv else None,
            "median_volume_error_ci": bootstrap_median(dv) if len(dv) > 1 else None,
            "energies": {repr(k): r.energy_per_atom for k, r in ok}, "seconds": round(seconds, 1)}


def perovskites(sample: int | None, seed: int, relax: bool, max_steps: int) -> dict[str, Any]:
    """The floor's effect on ``scripts/bench_discovery.py``'s candidates (its materials, prototypes and decorations at
    lattice scale 1): geometry, CGCNN's hull-mode top-20 % hits and, with ``relax``, SevenNet-0's (the funnel's) top-20 %
    hits and failures. Decorations the floor leaves unchanged are relaxed once and count for both modes."""
    import math
    import tempfile

    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_discovery as bd

    from amdflow.generate.volume import min_bond_ratio

    mats = bd.materials(sample, seed)
    folder = Path(tempfile.mkdtemp(prefix="bench_geometry_"))
    decs: dict[str, dict[str, dict[tuple, Any]]] = {}
    for mode, floor in (("volume rule", 0.0), ("floor", None)):
        decs[mode] = {m["material_id"]: {(m["material_id"], tuple(x.specie.symbol for x in s)): s
                                         for _, s in bd.candidates(m, (1.0,), folder, floor)} for m in mats}
    truth = {m["material_id"]: m["e_hull"] <= 0 for m in mats}
    shift = {m["material_id"]: m["e_hull"] - m["e_f"] for m in mats}  # E_hull_pred = E_f_pred + (E_hull_MP - E_f_MP)
    ids = [m["material_id"] for m in mats if decs["volume rule"][m["material_id"]]]
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, len(ids), len(ids)) for _ in range(1000)]

    def hits(pred: dict[str, float]) -> dict[str, Any]:
        """Stable materials in the top 20 % of ``ids`` by predicted E_hull (a material with no prediction ranks last),
        with a 95 % bootstrap interval over materials."""
        def count(sel: list[str]) -> int:
            order = sorted(range(len(sel)), key=lambda j: pred.get(sel[j], math.inf))
            return sum(truth[sel[j]] for j in order[: round(0.2 * len(sel))])

        per_boot = [count([ids[j] for j in b]) for b in boots]
        vals = sorted(per_boot)
        return {"hits": count(ids), "ci": [vals[24], vals[974]], "_boot": per_boot}

    def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """b's hits minus a's, with the 95 % interval of the difference over the same resamples."""
        d = sorted(y - x for x, y in zip(a.pop("_boot"), b.pop("_boot"), strict=True))
        return {"difference": b["hits"] - a["hits"], "ci": [d[24], d[974]]}

    out: dict[str, Any] = {"materials": len(ids), "stable": sum(truth[i] for i in ids), "modes": {}}
    changed = {k for i in ids for k, s in decs["floor"][i].items()
               if abs(s.volume / decs["volume rule"][i][k].volume - 1) > 1e-6}
    energies: dict[tuple, float | None] = {}
    if relax:
        from amdflow.campaign import FunnelConfig
        from amdflow.relax import get_funnel_engine

        todo = [(k, s) for i in ids for k, s in decs["volume rule"][i].items()]
        todo += [(("floor", *k), decs["floor"][k[0]][k]) for k in sorted(changed)]
        engine = get_funnel_engine(FunnelConfig(engine="sevennet", max_steps=max_steps))
        start = time.perf_counter()
        for begin in range(0, len(todo), 96):
            part = todo[begin:begin + 96]
            for (k, _), r in zip(part, engine.relax_many([s for _, s in part], 1), strict=True):
                energies[k] = None if isinstance(r, BaseException) else bd.mp2020_formation_energy(
                    r.final_structure, r.energy, bd.elemental_refs(), correct=True)
            print(f"relaxed {min(begin + 96, len(todo))}/{len(todo)}", file=sys.stderr, flush=True)
        out["relax_s"] = round(time.perf_counter() - start, 1)
    from amdflow.screen.predict import get_predictor

    predictor = get_predictor()
    for mode in ("volume rule", "floor"):
        keys = [k for i in ids for k in decs[mode][i]]
        structures = [decs[mode][k[0]][k] for k in keys]
        ratios = [min_bond_ratio(s) for s in structures]
        ef = dict(zip(keys, (float(v) for v in predictor.predict(structures)), strict=True))
        cg = {i: min(ef[k] for k in decs[mode][i]) + shift[i] for i in ids if decs[mode][i]}
        row = {"candidates": len(keys), "below_0.75": sum(r < 0.75 for r in ratios),
               "materials_without_candidate": sum(not decs[mode][i] for i in ids),
               "decorations_changed": len(changed) if mode == "floor" else 0, "cgcnn_top20": hits(cg)}
        if relax:
            e = {k: energies[("floor", *k) if mode == "floor" and k in changed else k] for k in keys}
            ml = {}
            for i in ids:
                vals = [e[k] for k in decs[mode][i] if e[k] is not None]
                if vals:
                    ml[i] = min(vals) + shift[i]
            row |= {"sevennet_failed": sum(v is None for v in e.values()), "sevennet_top20": hits(ml)}
        out["modes"][mode] = row
    before, after = out["modes"]["volume rule"], out["modes"]["floor"]
    out["floor_minus_volume_rule"] = {f: paired(before[f], after[f]) for f in ("cgcnn_top20", "sevennet_top20") if f in after}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["Ce-Fe-In", "Ce-Fe-C", "Na-Cl-Mg"])
    parser.add_argument("--max-sites", type=int, default=12)
    parser.add_argument("--funnel", action="store_true", help="also relax a sample of decorations with SevenNet-0")
    parser.add_argument("--sample", type=int, default=20, help="decorations relaxed per system (--funnel)")
    parser.add_argument("--max-steps", type=int, default=300, help="FIRE steps per relaxation (--funnel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perovskites", action="store_true",
                        help="instead: the floor's effect on scripts/bench_discovery.py's candidates (needs ../shared)")
    parser.add_argument("--perovskite-sample", type=int, default=None, help="materials (--perovskites; default all)")
    args = parser.parse_args()
    if args.perovskites:
        print(json.dumps(perovskites(args.perovskite_sample, 7, args.funnel, args.max_steps)))
        return
    rows = []
    generate(args.systems[0], "floor", args.max_sites)  # warm-up: the AFLOW library and radii read once
    for system in args.systems:
        made = {m: generate(system, m, args.max_sites) for m in MODES}
        base = sorted(made["volume rule"][0])
        sample = random.Random(args.seed).sample(base, min(args.sample, len(base)))
        kept_before = None
        for mode in MODES:
            structures, row = made[mode]
            ratios = row.pop("ratios")
            vals = list(ratios.values())
            row |= {"below_0.75": sum(r < 0.75 for r in vals), "below_0.85": sum(r < 0.85 for r in vals),
                    "min_ratio": round(min(vals), 3) if vals else None}
            sc = screen(structures, ratios)
            kept = sc.pop("kept")
            if kept_before is None:
                kept_before = kept
            row |= sc | {"top_k_kept_changed": len(kept - kept_before)}
            if args.funnel:
                row["funnel"] = funnel(structures, sample, args.max_steps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "funnel"} |
                             ({"funnel": {k: v for k, v in row["funnel"].items() if k != "energies"}} if args.funnel else {})),
                  file=sys.stderr, flush=True)
    if args.funnel:  # per pair of modes on the same decorations: which start reaches the lower energy
        for system in args.systems:
            e = {r["mode"]: r["funnel"]["energies"] for r in rows if r["system"] == system}
            both = set(e["volume rule"]) & set(e["floor"])
            for r in rows:
                if r["system"] == system and r["mode"] != "volume rule":
                    other = set(e["volume rule"]) & set(e[r["mode"]])
                    r["funnel"]["lower_than_volume_rule_by_0.01"] = sum(
                        e[r["mode"]][k] < e["volume rule"][k] - 0.01 for k in other)
                    r["funnel"]["higher_than_volume_rule_by_0.01"] = sum(
                        e[r["mode"]][k] > e["volume rule"][k] + 0.01 for k in other)
            del both
        for r in rows:
            r["funnel"].pop("energies")
    print(json.dumps({"max_sites": args.max_sites, "sample": args.sample, "max_steps": args.max_steps, "rows": rows}))


if __name__ == "__main__":
    main()
