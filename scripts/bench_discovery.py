"""Discovery benchmark: which screen spends a DFT budget on stable crystals, on 1,784 MP perovskites.

Data: ``../shared/datasets/mp_perovskites_pml`` (Materials Project ternary ABX3-type
perovskites and anti-perovskites, MP formation energies and energies above hull; 378 on
the hull). Every material becomes candidates the way amdflow makes them: a campaign of its
three elements on the ideal prototype of its space group (``prototypes/``; the cubic one
for the space groups without a prototype there), amdflow's own generator (every symmetry-
distinct decoration, cell from the volume rule, nothing relaxed), and the decorations of
the material's own composition kept. amdflow does not know which of them MP found, so a
material's prediction is the lowest over its decorations.

Screens: random; CGCNN E_f (exa-AMD's order); CGCNN minimum over exa-AMD's five lattice
scales (GNoME's trick); CGCNN hull mode; the funnel with CHGNet; the funnel with SevenNet-0;
CGCNN then the funnel (the full pipeline: a recall-first CGCNN cut, then SevenNet-0).
Ranked at equal DFT budgets (the top 10, 20, 30 % of materials) and at each screen's own
natural cut.

Predicted energy above hull, as Matbench Discovery defines it: an ML total energy gets
the MP2020 corrections (pymatgen's ``MaterialsProject2020Compatibility``; run type GGA or
GGA+U and MP's U values from the composition, POTCARs not checked: we have none) when the
potential was trained on uncorrected energies (SevenNet-0: MPtrj ``uncorrected_total_energy``),
and none when it was trained on corrected ones (CHGNet: MPtrj ``energy_per_atom``, which is
after MP2020; correcting again counts the anion and +U corrections twice),
formation energy against MP's elemental reference entries (``../shared/datasets/
mp_elemental_refs``), and ``E_hull_pred = E_hull_MP + (E_f_pred - E_f_MP)``: the rest of the
hull is held at DFT. CGCNN predicts E_f directly. Truth: MP ``energy_above_hull <= 0``
(also reported: <= 0.025). Relaxation: FIRE + Frechet cell filter, fmax 0.05 eV/A, at most
--max-steps steps (Matbench: 500), through amdflow's funnel engines (SevenNet batched by
torch-sim, CHGNet in worker processes).

Leak: CHGNet and SevenNet-0 were trained on MPtrj (Materials Project relaxations, which
include most of these materials) and CGCNN on MP 2017 (609 of these ids), so every figure
here is optimistic against truly new chemistry.

    python scripts/bench_discovery.py [--sample N] [--max-steps 300] [--cache FILE] [--write]

``--sample N``: N materials, seeded, stratified by stability. Relaxations are cached in
--cache (JSON, default under /tmp) so an interrupted run resumes. The last line printed is
one JSON object of the figures; ``--write`` appends a section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_screen import machine  # noqa: E402

from amdflow.relax.torchsim_relax import ENERGY_FLOOR_EV_PER_ATOM  # noqa: E402

warnings.filterwarnings("ignore")
SHARED = Path(os.environ.get("AMDFLOW_SHARED_DIR", REPO.parent / "shared")) / "datasets"
DATA = SHARED / "mp_perovskites_pml"
BUDGETS = (0.10, 0.20, 0.30)
SCALES = (0.96, 0.98, 1.0, 1.02, 1.04)  # exa-AMD's lattice scales
PROTOTYPE_FILES = {"Pm-3m": "Pm3m.cif", "P4/mmm": "P4_mmm.cif", "R-3m": "R_3m.cif"}


# ---------------------------------------------------------------- data
def materials(sample: int | None, seed: int) -> list[dict[str, Any]]:
    with open(DATA / "mp_perovskites_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["e_hull"] = float(r["energy_above_hull"])
        r["e_f"] = float(r["formation_energy_per_atom"])
    if sample and sample < len(rows):
        rng = random.Random(seed)
        stable = [r for r in rows if r["e_hull"] <= 0]
        other = [r for r in rows if r["e_hull"] > 0]
        n_stable = round(sample * len(stable) / len(rows))
        rows = rng.sample(stable, n_stable) + rng.sample(other, sample - n_stable)
    return sorted(rows, key=lambda r: r["material_id"])


def prototype(space_group: str) -> tuple[Path, bool]:
    """The prototype CIF of a space group, and whether it is its own (else the cubic perovskite)."""
    path = DATA / "prototypes" / PROTOTYPE_FILES.get(space_group, f"{space_group}.cif")
    return (path, True) if path.exists() else (DATA / "prototypes" / "Pm3m.cif", False)


def candidates(material: dict[str, Any], scales: tuple[float, ...], folder: Path,
               min_bond_ratio: float | None = None) -> list[tuple[float, Any]]:
    """(lattice scale, structure) of every decoration amdflow generates with the material's composition
    (``min_bond_ratio``: the generator's bond floor, None its default; 0 the volume rule alone)."""
    import shutil

    from pymatgen.core import Composition, Structure

    from amdflow.campaign import campaign_from_dict
    from amdflow.generate import generate_candidates

    comp = Composition(material["formula"])
    path, _ = prototype(material["space_group"])
    tdir = folder / path.stem
    if not tdir.exists():
        tdir.mkdir(parents=True)
        shutil.copy(path, tdir / path.name)
    cfg = campaign_from_dict({"name": "bench", "elements": [el.symbol for el in comp.elements],
                              "templates": [{"source": "folder", "path": str(tdir)}],
                              "generate": {"lattice_scales": list(scales), "include_subsystems": False, "exclude_elements": []}
                              | ({} if min_bond_ratio is None else {"min_bond_ratio": min_bond_ratio}),
                              "funnel": {"engine": "none"}, "output_dir": str(folder / "out")})
    out = []
    for doc in generate_candidates(cfg, workers=1):
        if Composition(doc["formula"]).reduced_formula == comp.reduced_formula:
            out.append((float(doc["lattice_scale"]), Structure.from_dict(doc["structure"])))
    return out


# ---------------------------------------------------------------- energies
def elemental_refs() -> dict[str, float]:
    from monty.json import MontyDecoder

    with gzip.open(SHARED / "mp_elemental_refs" / "2023-02-07-mp-elemental-reference-entries.json.gz") as fh:
        data = json.loads(fh.read())
    return {el: MontyDecoder().process_decoded(d).energy_per_atom for el, d in data.items()}


_U: dict[str, dict[str, float]] | None = None


#: Whether a funnel potential's energies already carry the MP2020 corrections (its MPtrj training label).
TRAINED_ON_CORRECTED = {"chgnet": True, "sevennet": False}


def mp2020_formation_energy(structure: Any, energy: float, refs: dict[str, float], correct: bool = True) -> float | None:
    """E_f (eV/atom) of an ML total energy against MP's elemental references, with the MP2020 corrections
    applied first unless ``correct`` is false (a potential trained on corrected energies)."""
    global _U
    comp = structure.composition
    if not correct:
        return (energy - sum(n * refs[el.symbol] for el, n in comp.items())) / comp.num_atoms
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    if _U is None:
        from pymatgen.io.vasp.sets import MPRelaxSet

        _U = MPRelaxSet.CONFIG["INCAR"]["LDAUU"]
    symbols = {el.symbol for el in comp.elements}
    hubbards = {}
    for anion in ("O", "F"):
        if anion in symbols:
            hubbards.update({el: u for el, u in _U.get(anion, {}).items() if el in symbols})
    entry = ComputedStructureEntry(structure, energy, parameters={"run_type": "GGA+U" if hubbards else "GGA",
                                                                   "hubbards": hubbards, "is_hubbard": bool(hubbards)})
    compat = MaterialsProject2020Compatibility(check_potcar=False)
    processed = compat.process_entry(entry, clean=True)
    if processed is None:
        return None
    return (processed.energy - sum(n * refs[el.symbol] for el, n in comp.items())) / comp.num_atoms


def cgcnn(structures: list[Any]) -> tuple[list[float], float]:
    from amdflow.screen.predict import get_predictor

    predictor = get_predictor()
    predictor.predict(structures[:2])  # warm
    start = time.perf_counter()
    values = [float(v) for v in predictor.predict(structures)]
    return values, time.perf_counter() - start


def relax(engine_name: str, keyed: list[tuple[str, Any]], max_steps: int, cache: dict[str, Any], save: Any,
          workers: int, chunk: int) -> float:
    """Relax every (key, structure) not in ``cache`` with the funnel's engine, ``save()`` after each chunk; seconds spent."""
    from amdflow.campaign import FunnelConfig
    from amdflow.relax import get_funnel_engine

    engine = get_funnel_engine(FunnelConfig(engine=engine_name, max_steps=max_steps))
    todo = [(k, s) for k, s in keyed if k not in cache]
    spent = cache.get(f"_seconds_{engine_name}", 0.0)
    if todo:
        engine.relax_many([todo[0][1], todo[0][1].copy()], workers)  # load the model, start the workers
    for begin in range(0, len(todo), chunk):
        part = todo[begin:begin + chunk]
        start = time.perf_counter()
        results = engine.relax_many([s for _, s in part], workers)
        spent += time.perf_counter() - start
        for (k, _), r in zip(part, results, strict=True):
            cache[k] = None if isinstance(r, BaseException) else {"energy": r.energy, "structure": r.final_structure.as_dict(),
                                                                   "converged": r.converged, "steps": r.n_steps}
        cache[f"_seconds_{engine_name}"] = spent
        save()
        print(f"{engine_name}: {begin + len(part)}/{len(todo)} relaxed, {spent:.0f} s", file=sys.stderr, flush=True)
    return spent


# ---------------------------------------------------------------- metrics
def metrics(selected: set[str], truth: dict[str, bool], label: str) -> dict[str, Any]:
    n, positives = len(truth), sum(truth.values())
    hits = sum(truth[m] for m in selected)
    precision = hits / len(selected) if selected else 0.0
    recall = hits / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    prevalence = positives / n
    return {"screen": label, "selected": len(selected), "hits": hits, "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4), "daf": round(precision / prevalence, 3) if prevalence else None}


def top(scores: dict[str, float], k: int) -> set[str]:
    return {m for m, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:k]}


def mae(pred: dict[str, float], truth: dict[str, float]) -> float:
    keys = [k for k in pred if k in truth and math.isfinite(pred[k])]
    return round(sum(abs(pred[k] - truth[k]) for k in keys) / len(keys), 4) if keys else float("nan")


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=None, help="materials (seeded, stratified by stability); default all")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CHGNet worker processes")
    parser.add_argument("--chunk", type=int, default=96, help="structures per batched relaxation call")
    parser.add_argument("--pipeline-keep", type=float, default=0.5,
                        help="the pipeline's CGCNN stage keeps this fraction of materials (lowest CGCNN E_hull first)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if not (DATA / "mp_perovskites_summary.csv").exists():
        raise SystemExit(f"needs {DATA} (../shared reference data)")
    mats = materials(args.sample, args.seed)
    cache_path = args.cache or Path(tempfile.gettempdir()) / f"amdflow_bench_discovery_{args.sample or 'all'}_{args.seed}_{args.max_steps}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    folder = Path(tempfile.mkdtemp(prefix="bench_discovery_"))
    t0 = time.perf_counter()
    decorations: dict[str, list[Any]] = {}
    scaled: dict[str, list[Any]] = {}
    own_prototype = 0
    for m in mats:
        cands = candidates(m, SCALES, folder)
        decorations[m["material_id"]] = [s for scale, s in cands if scale == 1.0]
        scaled[m["material_id"]] = [s for _, s in cands]
        own_prototype += prototype(m["space_group"])[1]
    gen_s = time.perf_counter() - t0
    mats = [m for m in mats if decorations[m["material_id"]]]
    ids = [m["material_id"] for m in mats]
    truth = {m["material_id"]: m["e_hull"] <= 0 for m in mats}
    truth_025 = {m["material_id"]: m["e_hull"] <= 0.025 for m in mats}
    e_hull_mp = {m["material_id"]: m["e_hull"] for m in mats}
    e_f_mp = {m["material_id"]: m["e_f"] for m in mats}
    n_cand = sum(len(decorations[i]) for i in ids)

    # CGCNN: every decoration, and every decoration at five lattice scales
    flat = [(i, s) for i in ids for s in decorations[i]]
    values, cg_s = cgcnn([s for _, s in flat])
    cg_ef: dict[str, float] = {}
    cg_best: dict[str, tuple[float, int]] = {}  # material -> (CGCNN E_f, index) of its CGCNN-lowest decoration
    seen: dict[str, int] = {}
    for (i, _), v in zip(flat, values, strict=True):
        cg_ef[i] = min(cg_ef.get(i, math.inf), v)
        k = seen[i] = seen.get(i, -1) + 1  # the decoration's index within its material (the cache key's)
        cg_best[i] = min(cg_best.get(i, (math.inf, -1)), (v, k))
    flat5 = [(i, s) for i in ids for s in scaled[i]]
    values5, cg5_s = cgcnn([s for _, s in flat5])
    cg5_ef: dict[str, float] = {}
    for (i, _), v in zip(flat5, values5, strict=True):
        cg5_ef[i] = min(cg5_ef.get(i, math.inf), v)
    hull = {i: e_hull_mp[i] + cg_ef[i] - e_f_mp[i] for i in ids}

    # the funnel's potentials on every decoration
    refs = elemental_refs()
    keyed = [(f"{i}#{k}", s) for i in ids for k, s in enumerate(decorations[i])]
    ml_ef: dict[str, dict[str, float]] = {}
    ml_ef_key: dict[str, dict[str, float]] = {}  # per decoration
    ml_s: dict[str, float] = {}
    ml_failed: dict[str, int] = {}
    from pymatgen.core import Structure

    for name in ("sevennet", "chgnet"):
        ml_s[name] = relax(name, keyed, args.max_steps, cache.setdefault(name, {}), lambda: cache_path.write_text(json.dumps(cache)),
                           args.workers if name == "chgnet" else 1, args.chunk)
        ef: dict[str, float] = {}
        failed = 0
        for key, _ in keyed:
            r = cache[name].get(key)
            if r is not None and r["energy"] / len(Structure.from_dict(r["structure"])) < ENERGY_FLOOR_EV_PER_ATOM:
                r = None  # a cell the potential collapsed (cached before the engine's guard): a failed relaxation
            value = None if r is None else mp2020_formation_energy(Structure.from_dict(r["structure"]), r["energy"], refs,
                                                                  correct=not TRAINED_ON_CORRECTED[name])
            if value is None:
                failed += 1
                continue
            i = key.split("#")[0]
            ef[i] = min(ef.get(i, math.inf), value)
            ml_ef_key.setdefault(name, {})[key] = value
        ml_ef[name], ml_failed[name] = ef, failed
    ml_hull = {name: {i: e_hull_mp[i] + ef[i] - e_f_mp[i] for i in ids if i in ef} for name, ef in ml_ef.items()}

    # the pipeline: CGCNN keeps the lowest --pipeline-keep fraction by its E_hull, SevenNet-0 ranks those
    keep = top(hull, max(1, round(args.pipeline_keep * len(ids))))
    pipeline = {i: v for i, v in ml_hull["sevennet"].items() if i in keep}
    kept_candidates = sum(len(decorations[i]) for i in keep)
    # the pipeline with CGCNN in top_k mode, k = 1: each formula's CGCNN-lowest decoration goes to SevenNet-0
    seven_key = ml_ef_key.get("sevennet", {})
    pipeline_top1 = {i: e_hull_mp[i] + seven_key[f"{i}#{cg_best[i][1]}"] - e_f_mp[i] for i in ids
                     if f"{i}#{cg_best[i][1]}" in seven_key}
    # the same with one decoration per formula drawn at random: what CGCNN's choice within a formula is worth
    pick = random.Random(args.seed + 1)
    drawn = {i: pick.randrange(len(decorations[i])) for i in ids}
    random_top1 = {i: e_hull_mp[i] + seven_key[f"{i}#{drawn[i]}"] - e_f_mp[i] for i in ids if f"{i}#{drawn[i]}" in seven_key}

    rng = random.Random(args.seed)
    random_scores = {i: rng.random() for i in ids}
    screens = {
        "random": random_scores, "cgcnn_ef": cg_ef, "cgcnn_min_scales": cg5_ef, "cgcnn_hull": hull,
        "funnel_chgnet": ml_hull["chgnet"], "funnel_sevennet": ml_hull["sevennet"], "pipeline": pipeline,
        "pipeline_top1": pipeline_top1, "random_top1": random_top1,
    }
    natural = {
        "random": None, "cgcnn_ef": {i for i, v in cg_ef.items() if v <= 0.0}, "cgcnn_min_scales": {i for i, v in cg5_ef.items() if v <= 0.0},
        "cgcnn_hull": {i for i, v in hull.items() if v <= 0.1}, "funnel_chgnet": {i for i, v in ml_hull["chgnet"].items() if v <= 0.1},
        "funnel_sevennet": {i for i, v in ml_hull["sevennet"].items() if v <= 0.1}, "pipeline": {i for i, v in pipeline.items() if v <= 0.1},
        "pipeline_top1": {i for i, v in pipeline_top1.items() if v <= 0.1},
        "random_top1": {i for i, v in random_top1.items() if v <= 0.1},
    }
    per_candidate_s = {"random": 0.0, "cgcnn_ef": cg_s / n_cand, "cgcnn_min_scales": cg5_s / n_cand, "cgcnn_hull": cg_s / n_cand,
                       "funnel_chgnet": ml_s["chgnet"] / n_cand, "funnel_sevennet": ml_s["sevennet"] / n_cand,
                       "pipeline": (cg_s + ml_s["sevennet"] * kept_candidates / n_cand) / n_cand,
                       "pipeline_top1": (cg_s + ml_s["sevennet"] * len(ids) / n_cand) / n_cand,
                       "random_top1": ml_s["sevennet"] * len(ids) / n_cand / n_cand}
    maes = {"random": None, "cgcnn_ef": mae(cg_ef, e_f_mp), "cgcnn_min_scales": mae(cg5_ef, e_f_mp), "cgcnn_hull": mae(cg_ef, e_f_mp),
            "funnel_chgnet": mae(ml_ef["chgnet"], e_f_mp), "funnel_sevennet": mae(ml_ef["sevennet"], e_f_mp),
            "pipeline": mae(ml_ef["sevennet"], e_f_mp), "pipeline_top1": mae(ml_ef["sevennet"], e_f_mp),
            "random_top1": mae(ml_ef["sevennet"], e_f_mp)}
    table = []
    for label, scores in screens.items():
        row = {"screen": label, "mae_ef": maes[label], "seconds_per_candidate": round(per_candidate_s[label], 4)}
        for b in BUDGETS:
            k = round(b * len(ids))
            chosen = top(scores, k)
            row[f"top{int(b * 100)}"] = metrics(chosen, truth, label)
            row[f"top{int(b * 100)}_025"] = metrics(chosen, truth_025, label)
        if natural[label] is not None:
            row["natural"] = metrics(natural[label], truth, label)
        table.append(row)
    by = {r["screen"]: r for r in table}
    figures = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(), "materials": len(ids),
        "materials_total": 1784, "stable": sum(truth.values()), "stable_025": sum(truth_025.values()), "candidates": n_cand,
        "own_prototype": own_prototype, "max_steps": args.max_steps, "pipeline_keep": args.pipeline_keep,
        "ml_failed": ml_failed, "generate_s": round(gen_s, 1), "cgcnn_s": round(cg_s, 1),
        "sevennet_s": round(ml_s["sevennet"], 1), "chgnet_s": round(ml_s["chgnet"], 1), "table": table,
        "daf_cgcnn": by["cgcnn_ef"]["top20"]["daf"], "daf_cgcnn_hull": by["cgcnn_hull"]["top20"]["daf"],
        "daf_funnel_chgnet": by["funnel_chgnet"]["top20"]["daf"], "daf_funnel_sevennet": by["funnel_sevennet"]["top20"]["daf"],
        "daf_pipeline": by["pipeline"]["top20"]["daf"],
        "hits_top20_pipeline_over_cgcnn": round(by["pipeline"]["top20"]["hits"] / max(by["cgcnn_ef"]["top20"]["hits"], 1), 2),
        "hits_top20_pipeline_top1_over_cgcnn": round(by["pipeline_top1"]["top20"]["hits"] / max(by["cgcnn_ef"]["top20"]["hits"], 1), 2),
        "pipeline_keep_sweep": sweep(hull, ml_hull["sevennet"], truth, len(ids)),
        "funnel_cut_sweep": {name: cut_sweep(ml_hull[name], truth, truth_025) for name in ("sevennet", "chgnet")},
        "cgcnn_threshold_sweep": threshold_sweep(cg_ef, ml_hull["sevennet"], truth, len(ids)),
    }
    if args.write:
        write_markdown(figures)
    print(json.dumps(figures))


def sweep(cg_hull: dict[str, float], ml_hull: dict[str, float], truth: dict[str, bool], n: int) -> list[dict[str, Any]]:
    """Stable materials in the top 20 % for pipelines keeping 10-100 % of the materials at the CGCNN stage."""
    out = []
    for keep in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
        kept = top(cg_hull, max(1, round(keep * n)))
        chosen = top({i: v for i, v in ml_hull.items() if i in kept}, round(0.2 * n))
        out.append({"keep": keep, "hits_top20": sum(truth[i] for i in chosen), "recall_of_cgcnn_stage": round(
            sum(truth[i] for i in kept) / max(sum(truth.values()), 1), 3)})
    return out


def threshold_sweep(cg_ef: dict[str, float], ml_hull: dict[str, float], truth: dict[str, bool], n: int) -> list[dict[str, Any]]:
    """CGCNN in threshold mode before the funnel: what each max_formation_energy_per_atom keeps, and what SevenNet-0 then
    finds in the top 20 %."""
    out = []
    for cut in (0.0, 0.25, 0.5, 1.0, 2.0):
        kept = {i for i, v in cg_ef.items() if v <= cut}
        chosen = top({i: v for i, v in ml_hull.items() if i in kept}, round(0.2 * n))
        out.append({"max_formation_energy_per_atom": cut, "kept": len(kept), "stable_kept": sum(truth[i] for i in kept),
                    "hits_top20": sum(truth[i] for i in chosen)})
    return out


def cut_sweep(ml_hull: dict[str, float], truth: dict[str, bool], truth_025: dict[str, bool]) -> list[dict[str, Any]]:
    """The funnel's own cut (max_e_above_hull on the ML hull): what it passes and what it finds, cut by cut."""
    out = []
    for cut in (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3):
        chosen = {i for i, v in ml_hull.items() if v <= cut}
        m = metrics(chosen, truth, f"cut {cut}")
        out.append({"cut": cut, "selected": m["selected"], "hits": m["hits"], "precision": m["precision"],
                    "recall": m["recall"], "f1": m["f1"], "hits_025": sum(truth_025[i] for i in chosen)})
    return out


def write_markdown(f: dict[str, Any]) -> None:
    names = {"random": "random", "cgcnn_ef": "CGCNN E_f (exa-AMD's order)", "cgcnn_min_scales": "CGCNN, minimum over 5 lattice scales",
             "cgcnn_hull": "CGCNN hull mode (E_hull_pred)", "funnel_chgnet": "funnel: CHGNet", "funnel_sevennet": "funnel: SevenNet-0",
             "pipeline": f"pipeline: CGCNN keeps {f['pipeline_keep']:.0%}, then SevenNet-0",
             "pipeline_top1": "pipeline: CGCNN top_k 1 per formula, then SevenNet-0",
             "random_top1": "control: 1 random decoration per formula, then SevenNet-0"}
    lines = []
    for r in f["table"]:
        cells = [names[r["screen"]]]
        for b in (10, 20, 30):
            m = r[f"top{b}"]
            cells.append(f"{m['hits']} / {m['precision']:.2f} / {m['daf']:.2f}")
        nat = r.get("natural")
        cells.append(f"{nat['selected']}: P {nat['precision']:.2f}, R {nat['recall']:.2f}, F1 {nat['f1']:.2f}, DAF {nat['daf']:.2f}"
                     if nat else "")
        m20 = r["top20"]
        cells += [f"{m20['recall']:.2f}", f"{m20['f1']:.2f}", f"{r['top20_025']['hits']}",
                  "" if r["mae_ef"] is None else f"{r['mae_ef']:.3f}", f"{r['seconds_per_candidate']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sweep_text = ", ".join(f"{s['keep']:.0%}: {s['hits_top20']} (CGCNN stage recall {s['recall_of_cgcnn_stage']:.2f})"
                           for s in f["pipeline_keep_sweep"])
    cut_lines = []
    for name, rows in f["funnel_cut_sweep"].items():
        cut_lines.append(f"- Funnel cut sweep, {name} (max_e_above_hull on the ML hull: passed / stable found / precision / recall): "
                         + "; ".join(f"{r['cut']}: {r['selected']} / {r['hits']} / {r['precision']:.2f} / {r['recall']:.2f}" for r in rows)
                         + ".")
    scope = ("all 1,784 materials" if f["materials"] >= 1784 else
             f"a stratified sample of {f['materials']} of the 1,784 (seeded; the whole set would take more than two hours here)")
    section = f"""
## Discovery: which screen spends the DFT budget on stable crystals (`scripts/bench_discovery.py`, {f['date']})

Machine: {f['machine']}. Data: ../shared MP perovskites, {scope}; {f['stable']} stable (E_hull <= 0), {f['stable_025']} within
0.025 eV/atom. {f['candidates']} candidates: amdflow's decorations of each material's composition on the ideal prototype of its
space group ({f['own_prototype']} materials; the others, whose space group has no prototype in the set, on the cubic one), cell from
the volume rule, unrelaxed; a material's prediction is its lowest decoration. Predicted E_hull as Matbench Discovery defines it
(ML energy MP2020-corrected when the potential was trained on uncorrected energies: SevenNet-0 yes, CHGNet no, its MPtrj label
is already corrected; MP elemental references, E_hull_pred = E_hull_MP + E_f_pred - E_f_MP; run type and U values from the
composition, POTCARs unchecked). Relaxations: FIRE + Frechet cell filter, fmax 0.05 eV/A, at most {f['max_steps']} steps (Matbench:
500). Failed or rejected ML energies: {f['ml_failed']}.

Columns "top k %": stable materials found / precision / DAF when the budget is the best-ranked k % of the materials.

| screen | top 10 % | top 20 % | top 30 % | own cut (0.0 E_f, 0.1 E_hull): selected, P, R, F1, DAF | recall top 20 % | F1 top 20 % | <= 0.025 found, top 20 % | MAE E_f (eV/atom) | s per candidate |
| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

- Full pipeline over CGCNN alone, stable crystals in the same DFT budget (top 20 %): **{f['hits_top20_pipeline_over_cgcnn']}x**.
- Full pipeline with CGCNN in top_k mode (k = 1 per formula: half the funnel's relaxations here) over CGCNN alone, top 20 %:
  **{f['hits_top20_pipeline_top1_over_cgcnn']}x**.
- The pipeline's CGCNN stage, stable materials found in the top 20 % by the share it keeps: {sweep_text}.
{chr(10).join(cut_lines)}
- CGCNN threshold before the funnel (max_formation_energy_per_atom: materials kept / stable kept / SevenNet-0's top-20 % hits
  among them): {"; ".join(f"{r['max_formation_energy_per_atom']}: {r['kept']} / {r['stable_kept']} / {r['hits_top20']}"
                             for r in f["cgcnn_threshold_sweep"])}.
- Wall time here: generation {f['generate_s']} s, CGCNN {f['cgcnn_s']} s, SevenNet-0 {f['sevennet_s']} s (batched, one process),
  CHGNet {f['chgnet_s']} s (worker processes), for {f['candidates']} candidates.
- **Training-set leak**: CHGNet and SevenNet-0 were trained on MPtrj, Materials Project relaxations that include most of these
  materials, and CGCNN on MP 2017 data (609 of these ids); every figure is optimistic for truly new chemistry (Matbench
  Discovery's WBM set, built to avoid this, is not on this machine).
"""
    path = REPO / "BENCHMARKS.md"
    path.write_text(path.read_text() + section)


if __name__ == "__main__":
    main()
