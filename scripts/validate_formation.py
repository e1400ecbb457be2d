"""Formation energies through amdflow's own reference, correction and hull code, checked against the Materials Project.

Data: ``../shared/datasets/mp_perovskites_pml`` (1,784 MP ternary perovskites and anti-perovskites: MP's
structures and MP's formation energies; anions O, N, F, Cl, Br, I, S, H, Se). MP's own structures are
relaxed with a campaign's engine (CHGNet: the default final engine; SevenNet-0: the default funnel), and
every energy goes the way a campaign's does:

* elemental references: :meth:`amdflow.campaign.RelaxConfig.reference_structures` (each element's shipped
  ground state, :mod:`amdflow.thermo.ground_states`) built by :func:`amdflow.stages.reference_structure`
  and relaxed by the same engine with the same settings; the lowest per element wins, as on a hull;
* corrections: :func:`amdflow.stages.task_doc` (the engine's policy, :mod:`amdflow.thermo.corrections`:
  MP2020 for SevenNet-0, none applied to CHGNet, whose energies carry it);
* formation energy: :func:`amdflow.builders.thermo.build_system`, the hull builder itself (which also
  refuses a hull of mixed schemes), on each compound's ternary system.

``--before`` runs the pipeline as it was before issue 25: references fcc, bcc and hcp only, no correction.

The anion group of a compound is its most electronegative element. MP's formation energies are those of
MP's current database (fetched 2023-24: its GGA/GGA+U/r2SCAN mixed hull, MP2020-corrected), so a part
of the error is MP's r2SCAN mixing, which no PBE-trained potential can follow.

Training-set overlap: both potentials were trained on MPtrj (MP relaxation frames, database v2021.11.10,
MP2020-compatible labels), which holds most of these materials; every figure here is in-distribution,
an optimistic bound for new compounds. The ids CGCNN's 2017 list holds (surely in MPtrj) are reported
apart from the rest.

    python scripts/validate_formation.py --engine chgnet --sample 300 [--before] [--json] [--seed 0]

Relaxations are cached (``--cache``, default under /tmp) so an interrupted or a ``--before`` run reuses them.
The last line with ``--json`` is one JSON object: ``mae_ef_<engine>``, ``max_group_mae_<engine>``, ``n``,
``failed``, and the per-group, per-overlap and per-element figures.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore")
SHARED = Path(os.environ.get("AMDFLOW_SHARED_DIR", REPO.parent / "shared")) / "datasets"
DATA = SHARED / "mp_perovskites_pml"
MP_REFS = SHARED / "mp_elemental_refs" / "2023-02-07-mp-elemental-reference-entries.json.gz"
OLD_REFERENCES = ["fcc", "bcc", "hcp"]  # amdflow's default before issue 25
MIN_PER_GROUP = 5


# ---------------------------------------------------------------- data
ANIONS = ("O", "N", "F", "Cl", "Br", "I", "S", "H", "Se")  # the dataset's anion groups (issue 25)
OTHER = "other"  # intermetallic and carbide (anti-)perovskites, e.g. Ce3PdIn-type, Mn3ZnC


def anion(formula: str) -> str:
    """The compound's anion group: its most electronegative element among ANIONS, else OTHER."""
    from pymatgen.core import Composition

    present = [el for el in Composition(formula).elements if el.symbol in ANIONS]
    return max(present, key=lambda el: (el.X, el.Z)).symbol if present else OTHER


def materials(sample: int | None, seed: int) -> list[dict[str, Any]]:
    """The perovskites (all, or ``sample`` of them stratified by anion group: proportional, at least
    MIN_PER_GROUP per group, seeded), sorted by id."""
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} is missing: this benchmark needs ../shared/datasets (or AMDFLOW_SHARED_DIR)")
    with open(DATA / "mp_perovskites_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["e_f_mp"] = float(r["formation_energy_per_atom"])
        r["group"] = anion(r["formula"])
        r["old_id"] = r["in_cgcnn_paper_id_list"] == "True"
    if sample and sample < len(rows):
        rng = random.Random(seed)
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in sorted(rows, key=lambda r: r["material_id"]):
            groups.setdefault(r["group"], []).append(r)
        floor = {g: min(MIN_PER_GROUP, len(m), sample // len(groups)) for g, m in groups.items()}
        rest = sample - sum(floor.values())
        share = {g: rest * (len(m) - floor[g]) / (len(rows) - sum(floor.values())) for g, m in groups.items()}
        quota = {g: floor[g] + int(share[g]) for g in groups}
        for g in sorted(groups, key=lambda g: -(share[g] - int(share[g])))[: sample - sum(quota.values())]:
            quota[g] += 1  # largest remainders
        rows = [r for g, m in groups.items() for r in rng.sample(m, min(quota[g], len(m)))]
    return sorted(rows, key=lambda r: r["material_id"])


def structures(ids: list[str]) -> dict[str, Any]:
    from pymatgen.core import Structure

    wanted = {f"MP/{i}.cif": i for i in ids}
    out = {}
    with tarfile.open(DATA / "mp_perovskite_cifs.tar.gz") as tar:
        for member in tar:
            if member.name in wanted:
                text = tar.extractfile(member).read().decode()
                out[wanted[member.name]] = Structure.from_str(text, fmt="cif")
    return out


def mp_reference_energies() -> dict[str, float]:
    """MP's elemental ground-state energies (eV/atom, GGA; MP2020 leaves elements alone)."""
    with gzip.open(MP_REFS, "rt") as fh:
        data = json.load(fh)
    return {el: float(d["energy"]) / sum(d["composition"].values()) for el, d in data.items()}


# ---------------------------------------------------------------- the engine
def make_engine(name: str, fmax: float, max_steps: int, before: bool) -> tuple[Any, Any]:
    """(engine, relax settings) as a campaign builds them; ``before``: the engine with no correction applied."""
    from amdflow.campaign import FunnelConfig, RelaxConfig
    from amdflow.relax import get_engine, get_funnel_engine

    refs = {"reference_ground_state": not before, "reference_prototypes": OLD_REFERENCES if before else []}
    relax_cfg = RelaxConfig(engine="chgnet", fmax=fmax, max_steps=max_steps, **refs)
    if name == "chgnet":
        engine = get_engine(relax_cfg)
    else:
        engine = get_funnel_engine(FunnelConfig(engine="sevennet", fmax=fmax, max_steps=max_steps))
    return (_Uncorrected(engine) if before else engine), relax_cfg


class _Uncorrected:
    """The engine as amdflow ran it before issue 25: the same relaxations, no correction applied to its energies."""

    def __init__(self, engine: Any) -> None:
        from amdflow.thermo.corrections import CorrectionPolicy, CorrectionScheme

        self._engine = engine
        self.correction = CorrectionPolicy(CorrectionScheme.NONE, "before issue 25: no correction anywhere")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def relax_all(engine: Any, keyed: list[tuple[str, Any]], cache: dict[str, Any], save: Any, workers: int,
              chunk: int = 64) -> float:
    """Relax every (key, structure) not cached; ``save()`` after each chunk; seconds spent this run."""
    todo = [(k, s) for k, s in keyed if k not in cache]
    spent = 0.0
    for begin in range(0, len(todo), chunk):
        part = todo[begin:begin + chunk]
        start = time.perf_counter()
        results = engine.relax_many([s for _, s in part], workers)
        spent += time.perf_counter() - start
        for (k, _), r in zip(part, results, strict=True):
            cache[k] = ({"error": f"{type(r).__name__}: {r}"[:300]} if isinstance(r, BaseException) else
                        {"energy": r.energy, "structure": r.final_structure.as_dict(), "converged": r.converged,
                         "n_steps": r.n_steps, "max_force": r.max_force})
        save()
        print(f"  {begin + len(part)}/{len(todo)} relaxed, {spent:.0f} s", file=sys.stderr, flush=True)
    return spent


def result_of(cached: dict[str, Any]) -> Any:
    from pymatgen.core import Structure

    from amdflow.relax.base import RelaxResult

    return RelaxResult(Structure.from_dict(cached["structure"]), cached["energy"], cached["converged"], cached["n_steps"],
                       cached["max_force"], 0.0)


# ---------------------------------------------------------------- figures
def bootstrap_mae(errors: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    a = np.abs(np.asarray(errors))
    means = a[rng.integers(0, len(a), size=(n, len(a)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["chgnet", "sevennet"], default="chgnet")
    parser.add_argument("--sample", type=int, default=None, help="this many perovskites, stratified by anion (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--before", action="store_true", help="references fcc/bcc/hcp, no correction (amdflow before issue 25)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/amdflow_validate_formation.json"))
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (the last line)")
    args = parser.parse_args()

    from amdflow.builders.thermo import build_system
    from amdflow.stages import reference_name, reference_structure, task_doc
    from amdflow.thermo.corrections import CorrectionError

    rows = materials(args.sample, args.seed)
    cells = structures([r["material_id"] for r in rows])
    engine, relax_cfg = make_engine(args.engine, args.fmax, args.max_steps, args.before)
    print(f"{len(rows)} perovskites, engine {engine.run_type} ({engine.correction.scheme.value}), references "
          f"{relax_cfg.reference_structures()}", file=sys.stderr)
    cache: dict[str, Any] = json.loads(args.cache.read_text()) if args.cache.exists() else {}

    def save() -> None:
        tmp = args.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(args.cache)

    rt = engine.run_type
    elements = sorted({el.symbol for s in cells.values() for el in s.composition.elements})
    ref_keyed = [(f"{rt}|ref|{el}|{p}", el, p) for el in elements for p in relax_cfg.reference_structures()]
    seconds = relax_all(engine, [(k, reference_structure(el, p)) for k, el, p in ref_keyed], cache, save, args.workers)
    seconds += relax_all(engine, [(f"{rt}|{i}", cells[i]) for i in sorted(cells)], cache, save, args.workers)

    settings = relax_cfg.model_dump(mode="json")
    ref_tasks: dict[str, list[dict[str, Any]]] = {}
    ref_failed = []
    for key, el, proto in ref_keyed:
        c = cache[key]
        if "error" in c:
            ref_failed.append(f"{el} {proto}: {c['error']}")
            continue
        s = reference_structure(el, proto)
        doc = task_doc("reference", f"ref-{el}-{proto}-{rt}", s, result_of(c), engine, None, None, settings=settings,
                       level="final", reference={"element": el, "structure": proto, "name": reference_name(el, proto)}).to_mongo()
        ref_tasks.setdefault(el, []).append(doc)
    mp_refs = mp_reference_energies()
    ref_table = []
    for el in elements:
        best = min((d for d in ref_tasks.get(el, []) if d["converged"]), key=lambda d: d["energy_per_atom"], default=None)
        ref_table.append({"element": el, "reference": None if best is None else best["reference"]["name"],
                          "energy_per_atom": None if best is None else best["energy_per_atom"], "mp_energy_per_atom": mp_refs.get(el),
                          "delta": None if best is None else best["energy_per_atom"] - mp_refs[el]})

    errors: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for r in rows:
        i = r["material_id"]
        c = cache[f"{rt}|{i}"]
        if "error" in c:
            failed.append({"id": i, "why": c["error"]})
            continue
        try:
            task = task_doc("candidate", i, cells[i], result_of(c), engine, None, None, settings=settings, level="final").to_mongo()
        except CorrectionError as err:
            failed.append({"id": i, "why": str(err)})
            continue
        els = sorted(task["elements"])
        item = {"chemsys": "-".join(els), "run_type": rt, "sources": {}, "known": [],
                "tasks": [task, *[d for el in els for d in ref_tasks.get(el, [])]]}
        built = build_system(item, include_unconverged=True)  # a compound at max_steps still gets its E_f
        mine = next((d for d in built["docs"] if d["material_id"] == i), None)
        if mine is None:
            failed.append({"id": i, "why": built["build"]["error"] or "no hull"})
            continue
        errors.append({"id": i, "formula": r["formula"], "group": r["group"], "old_id": r["old_id"],
                       "e_f": mine["formation_energy_per_atom"], "e_f_mp": r["e_f_mp"],
                       "error": mine["formation_energy_per_atom"] - r["e_f_mp"], "converged": task["converged"],
                       "correction_per_atom": task["correction"] / task["nsites"]})

    def mae(sub: list[dict[str, Any]]) -> float | None:
        return sum(abs(e["error"]) for e in sub) / len(sub) if sub else None

    groups = {g: [e for e in errors if e["group"] == g] for g in sorted({e["group"] for e in errors})}
    group_mae = {g: {"n": len(v), "mae": mae(v), "mean_error": sum(e["error"] for e in v) / len(v)} for g, v in groups.items()}
    name = args.engine
    lo, hi = bootstrap_mae([e["error"] for e in errors], args.seed)
    out = {
        f"mae_ef_{name}": mae(errors), f"max_group_mae_{name}": max(v["mae"] for g, v in group_mae.items() if g != OTHER),
        "n": len(errors), "failed": len(failed), "engine": name, "run_type": rt, "correction": engine.correction.scheme.value,
        "references": relax_cfg.reference_structures(), "before_issue_25": args.before, "sample": args.sample, "seed": args.seed,
        "mae_ci95": [lo, hi], "median_abs_error": sorted(abs(e["error"]) for e in errors)[len(errors) // 2],
        "groups": group_mae,
        "overlap": {"in_cgcnn_2017_ids (in MPtrj)": {"n": sum(e["old_id"] for e in errors), "mae": mae([e for e in errors if e["old_id"]])},
                    "newer_ids": {"n": sum(not e["old_id"] for e in errors), "mae": mae([e for e in errors if not e["old_id"]])}},
        # MP entries far above their hull (MP E_f > 1 eV/atom off what MP's own cell relaxes to) are structures the
        # relaxation leaves: reported, and the MAE without them beside the full one (never instead of it)
        "outliers": [{k: e[k] for k in ("id", "formula", "group", "e_f", "e_f_mp", "error")} for e in errors if abs(e["error"]) > 1.0],
        "mae_without_outliers": mae([e for e in errors if abs(e["error"]) <= 1.0]),
        "groups_without_outliers": {g: mae([e for e in v if abs(e["error"]) <= 1.0]) for g, v in groups.items()},
        "unconverged": sum(not e["converged"] for e in errors), "relax_seconds_this_run": round(seconds, 1),
        "reference_failures": ref_failed, "failures": failed[:20],
        "references_vs_mp": ref_table,
        "worst": sorted(errors, key=lambda e: -abs(e["error"]))[:10],
    }
    print(f"\n{name} ({rt}, correction {out['correction']}): MAE(E_f) {out[f'mae_ef_{name}']:.4f} eV/atom "
          f"[95% CI {lo:.4f}, {hi:.4f}] on {len(errors)}, {len(failed)} failed", file=sys.stderr)
    for g, v in group_mae.items():
        print(f"  {g:3s} n={v['n']:4d}  MAE {v['mae']:.4f}  mean error {v['mean_error']:+.4f}", file=sys.stderr)
    big = [r for r in ref_table if r["delta"] is not None and abs(r["delta"]) > 0.05]
    print("  references more than 0.05 eV/atom from MP's: " + (", ".join(f"{r['element']} {r['delta']:+.3f} ({r['reference']})"
                                                                      for r in big) or "none"), file=sys.stderr)
    if args.json:
        print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
