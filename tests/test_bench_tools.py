"""The discovery benchmark's own tools: bootstrap budgets, the relaxation cache, and a --write that replaces its block.

These decide figures in BENCHMARKS.md, so they are checked against known answers like any other code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
bench = pytest.importorskip("bench_discovery")


def test_budget_hits_without_resampling_is_the_plain_top_k_and_draws_weigh_materials():
    ids = ["a", "b", "c", "d", "e"]
    truth = {"a": True, "b": False, "c": True, "d": False, "e": True}
    scores = {"a": 0.1, "b": 0.0, "c": 0.3, "d": 0.2, "e": 0.4}  # order b, a, d, c, e
    once = np.ones((1, 5), int)
    hits, daf = bench.budget_hits(scores, truth, ids, 0.4, once)  # k = 2: b, a
    assert hits.tolist() == [1.0] and daf[0] == pytest.approx((1 / 2) / (3 / 5))
    assert bench.budget_hits(scores, truth, ids, 0.6, once)[0].tolist() == [1.0]  # b, a, d
    twice_a = np.array([[2, 1, 1, 1, 0]])  # a drawn twice, e not at all: top 2 = b, a (one copy), prevalence 3/5
    assert bench.budget_hits(scores, truth, ids, 0.4, twice_a)[0].tolist() == [1.0]
    assert bench.budget_hits({**scores, "b": 9.0}, truth, ids, 0.4, twice_a)[0].tolist() == [2.0]  # both copies of a
    missing = {k: v for k, v in scores.items() if k != "b"}  # no score: ranks last
    assert bench.budget_hits(missing, truth, ids, 0.4, once)[0].tolist() == [1.0]  # a, d


def test_random_expectation_is_k_times_the_prevalence():
    out = bench.random_expectation(100, 20, 10)
    assert out["hits"] == 2.0 and out["daf"] == 1.0 and out["hits_ci95"][0] <= 2 <= out["hits_ci95"][1]


class _Engine:
    run_type = "sevennet-test|fmax0.05"

    def __init__(self) -> None:
        self.calls = 0

    def relax_many(self, structures, workers=1):
        from amdflow.relax.base import RelaxResult

        self.calls += 1
        return [ValueError("failed") if s.composition.reduced_formula == "Al" else
                RelaxResult(s, -4.0 * len(s), True, 3, 0.01, 0.0) for s in structures]


def test_relax_cache_keys_by_run_type_and_structure_retries_failures_and_guards_on_reading(tmp_path):
    path = tmp_path / "cache.json"
    fe = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    al = Structure(Lattice.cubic(4.05), ["Al"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    engine = _Engine()
    cache = bench.RelaxCache(path)
    cache.relax(engine, [fe, al, fe.copy()], 1, 8, "test")
    assert (cache.new, cache.failed) == (1, 1) and json.loads(path.read_text())["version"] == bench.CACHE_VERSION
    assert cache.result(engine, fe).energy == -8.0 and cache.result(engine, al) is None
    again = bench.RelaxCache(path)
    again.relax(engine, [fe, al], 1, 8, "test")  # Fe read back; Al, which failed, is tried again
    assert (again.hits, again.new, again.failed) == (1, 0, 1)
    other = type("Other", (_Engine,), {"run_type": "chgnet-test"})()
    assert again.result(other, fe) is None  # another model or setting is another key
    # a cached result a guard now rejects (a collapse to a tenth of the volume) is not read back
    entry = again.entries[again.key(engine, fe)]
    entry["structure"] = Structure(Lattice.cubic(2.87 * 0.1 ** (1 / 3)), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()
    assert again.result(engine, fe) is None and again.guarded == 1
    path.write_text(json.dumps({"mp-1#0": {"energy": 1.0}}))  # the old format: ignored, said so
    assert bench.RelaxCache(path).entries == {} and bench.RelaxCache(path).stale_format


def test_write_replaces_its_block_and_keeps_the_reading_after_it(tmp_path, monkeypatch):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\n{bench.SECTION} (old)\n\nold figures\n\nReading it: old.\n\n## Next section\n\nkept\n")
    figures = {"date": "2026-12-06", "machine": "test", "materials": 2, "stable": 1, "stable_025": 1, "candidates": 2,
               "own_prototype": 2, "models": {"sevennet": "x"}, "max_steps": 10, "ml_failed": {}, "seed": 7,
               "cache": {"hits": 0, "new_relaxations": 2}, "bootstrap_draws": 10, "pipeline_keep": 0.5,
               "table": [{"screen": "random", "relaxations": 0, "mae_ef": None,
                          **{f"top{b}": {"hits": 0.2, "hits_ci95": [0, 1], "daf": 1.0} for b in (10, 20, 30)}}],
               "random_expected_hits_top20": 0.4, "over_random_top20": {}, "paired_top20": [],
               "pipeline_keep_sweep": [], "funnel_cut_sweep": {}, "funnel_cut_sweep_mp_anchored": {},
               "on_own_hull": {"sevennet": 1, "chgnet": 1}, "systems": 2}
    bench.write_markdown(figures, doc)
    first = doc.read_text()
    assert first.count(bench.SECTION) == 1 and "old figures" not in first and "## Next section\n\nkept" in first
    text = first.replace(bench.END, bench.END + "\n\nReading it: the people's part.")
    doc.write_text(text)
    bench.write_markdown({**figures, "date": "2026-12-07"}, doc)
    second = doc.read_text()
    assert second.count(bench.SECTION) == 1 and "2026-12-07" in second and "2026-12-06" not in second
    assert "Reading it: the people's part." in second and second.endswith("kept\n")
