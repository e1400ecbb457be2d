"""Candidate geometry with and without the bond-length floor (issue 26), on blind ternary campaigns.

Every AFLOW prototype of up to --max-sites sites, each target system generated twice: with the volume rule alone
(``generate.min_bond_ratio: 0``, exa-AMD's) and with today's floor. Per system and mode: candidates, the share whose
shortest bond is below 0.75x / 0.85x the summed covalent radii, how many CGCNN screens out (predicted E_f above
``screen.max_formation_energy_per_atom``, 1.0 eV/atom by default), and with ``--funnel`` how many SevenNet-0
relaxations fail (the funnel's engine and settings, 300 steps).

    python scripts/bench_geometry.py [--systems Ce-Fe-In Ce-Fe-C Na-Cl-Mg] [--max-sites 12] [--funnel]

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")


def figures(system: str, floor: float | None, max_sites: int, funnel: bool) -> dict:
    from pymatgen.core import Structure

    from amdflow.campaign import FunnelConfig, campaign_from_dict
    from amdflow.generate import generate_candidates
    from amdflow.generate.substitute import GenerateReport
    from amdflow.relax import get_funnel_engine
    from amdflow.screen.predict import get_predictor

    gen = {"include_subsystems": False} | ({} if floor is None else {"min_bond_ratio": floor})
    cfg = campaign_from_dict({"name": "geometry", "elements": system.split("-"), "generate": gen,
                              "templates": [{"source": "aflow", "max_sites": max_sites}]})
    report = GenerateReport()
    start = time.perf_counter()
    docs = list(generate_candidates(cfg, report, workers=1))
    seconds = time.perf_counter() - start
    ratios = [d["min_bond_ratio"] for d in docs]
    structures = [Structure.from_dict(d["structure"]) for d in docs]
    ef = [float(v) for v in get_predictor().predict(structures)] if structures else []
    cut = cfg.screen.max_formation_energy_per_atom
    out = {"system": system, "floor": cfg.generate.min_bond_ratio, "candidates": len(docs), "generate_s": round(seconds, 3),
           "skipped": dict(report.stats.filtered), "below_0.75": sum(r < 0.75 for r in ratios),
           "below_0.85": sum(r < 0.85 for r in ratios), "min_ratio": min(ratios, default=None),
           "cgcnn_screened_out": sum(e > cut for e in ef),
           "cgcnn_screened_out_below_0.75": sum(e > cut and r < 0.75 for e, r in zip(ef, ratios, strict=True))}
    if funnel and structures:
        engine = get_funnel_engine(FunnelConfig(engine="sevennet"))
        start = time.perf_counter()
        results = engine.relax_many(structures, 1)
        out["funnel_failed"] = sum(isinstance(r, BaseException) for r in results)
        out["funnel_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["Ce-Fe-In", "Ce-Fe-C", "Na-Cl-Mg"])
    parser.add_argument("--max-sites", type=int, default=12)
    parser.add_argument("--funnel", action="store_true", help="also relax every candidate with SevenNet-0")
    args = parser.parse_args()
    rows = []
    for system in args.systems:
        for floor in (0.0, None):
            row = figures(system, floor, args.max_sites, args.funnel)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"max_sites": args.max_sites, "rows": rows}))


if __name__ == "__main__":
    main()
