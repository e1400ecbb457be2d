"""Dedup: the greedy rule, the exact buckets against plain StructureMatcher, and the stage's batched and per-Firework paths."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from amdflow.select import (
    Member,
    dedup_bucket,
    dedup_matcher,
    greedy_families,
    may_map_lattice,
    may_match,
    reduce_for_matching,
)


def b2(a=2.9, swap=False):
    species = ["Al", "Fe"] if swap else ["Fe", "Al"]
    return Structure(Lattice.cubic(a), species, [[0, 0, 0], [0.5, 0.5, 0.5]])


def l10(a=2.7, c=4.6):
    return Structure(Lattice.tetragonal(a, c), ["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def members(entries):
    m = dedup_matcher()
    return [Member(cid, e, reduce_for_matching(s, m)) for cid, e, s in entries]


def test_greedy_rule_lowest_energy_of_a_family_is_kept():
    pool = members([("a", -0.3, b2()), ("b", -0.5, b2(a=3.1, swap=True)), ("c", -0.9, l10())])
    decisions = {d.candidate_id: d for d in greedy_families(pool, [], dedup_matcher())}
    assert decisions["c"].duplicate_of is None and decisions["b"].duplicate_of is None  # two families
    assert decisions["a"].duplicate_of == "b"  # the scaled, swapped B2 is b's family; b is lower
    assert decisions["a"].compared == 1  # c (lower) has no lattice of B2's shape: only b is fitted


def test_greedy_rule_ties_go_to_the_smaller_id_and_input_order_does_not_matter():
    entries = [("c", -0.5, b2()), ("a", -0.5, b2(a=3.0)), ("b", -0.2, b2(a=2.8, swap=True))]
    for order in itertools.permutations(entries):
        decisions = {d.candidate_id: d.duplicate_of for d in greedy_families(members(order), [], dedup_matcher())}
        assert decisions == {"a": None, "c": "a", "b": "a"}


def test_greedy_rule_meets_earlier_representatives_first():
    reps = members([("z", -0.1, b2())])  # kept by an earlier pass (a later-predicted member arrives)
    (d,) = greedy_families(members([("y", -0.7, b2(a=3.05))]), reps, dedup_matcher())
    assert d.duplicate_of == "z"


def _matching_set(n_templates: int = 24) -> list[Structure]:
    """Structures of one formula (AlNi) the way amdflow makes them, with near-duplicates of several kinds.

    Every AFLOW prototype amdflow substitutes into (2 lattice scales each), plus supercells
    (same crystal, more sites: they must fall into the primitive's bucket and match it) and
    copies with random displacements, some within StructureMatcher's tolerance, some not.
    """
    from amdflow.campaign import campaign_from_dict
    from amdflow.generate.substitute import generate_candidates

    cfg = campaign_from_dict({"name": "pairs", "elements": ["Ni", "Al"], "templates": [{"source": "aflow", "max_sites": 8}],
                              "generate": {"lattice_scales": [1.0, 1.03]}, "funnel": {"engine": "none"},
                              "output_dir": "/nonexistent"})
    docs = [d for d in generate_candidates(cfg, workers=1) if d["formula"] == "AlNi"]
    templates = sorted({d["template"]["template_id"] for d in docs})[:n_templates]
    structures = [Structure.from_dict(d["structure"]) for d in docs if d["template"]["template_id"] in templates]
    rng = np.random.default_rng(7)
    extra = []
    for s in structures[::8]:
        extra.append(s * (2, 1, 1) if len(s) <= 4 else s * (1, 1, 1))
        for amplitude in (0.05, 0.6):
            moved = s.copy()
            for i, shift in enumerate(rng.normal(0, amplitude, (len(s), 3))):
                moved.translate_sites([i], shift, frac_coords=False)
            extra.append(moved)
    return structures + extra


@pytest.mark.slow
def test_buckets_and_reduced_fits_agree_with_plain_structure_matcher_on_every_pair():
    structures = _matching_set()
    assert len(structures) >= 60
    plain = StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5.0)
    matcher = dedup_matcher(0.2, 0.3, 5.0)
    reduced = [reduce_for_matching(s, matcher) for s in structures]
    buckets = [dedup_bucket(r) for r in reduced]
    pool = [Member(str(i), 0.0, r) for i, r in enumerate(reduced)]
    assert len(set(buckets)) >= 3  # the invariant does split the formula
    for m in pool:  # the successive minima from the lattice points are the Niggli cell's lengths
        niggli = m.reduced.lattice.get_niggli_reduced_lattice()
        np.testing.assert_allclose(m.minima, np.sort(niggli.lengths) / m.reduced.volume ** (1 / 3), rtol=1e-9)
    matches = across_sizes = ruled_out = ruled_out_full = same_bucket = 0
    for i, j in itertools.permutations(range(len(structures)), 2):  # fit(s1, s2) is not symmetric: both orders
        fit = plain.fit(structures[i], structures[j])
        assert matcher.fit(reduced[i], reduced[j], skip_structure_reduction=True) == fit, (i, j)
        if buckets[i] == buckets[j]:
            same_bucket += 1
            ruled_out += not may_match(pool[i], pool[j], 0.2)
            ruled_out_full += not may_match(pool[i], pool[j], 0.2, 5.0)
            # the full lattice test is find_all_mappings' (determinant 1) on cached lattice points, no weaker
            has_mapping = any(abs(round(np.linalg.det(m))) == 1 for *_, m in _scaled(reduced[i], reduced[j])
                              .lattice.find_all_mappings(_scaled(reduced[j], reduced[i]).lattice, 0.2, 5.0, True))
            assert may_map_lattice(pool[i], pool[j], 0.2, 5.0) >= has_mapping, (i, j)
        if fit:
            matches += 1
            assert buckets[i] == buckets[j], (i, j)  # a match never crosses buckets
            assert may_match(pool[i], pool[j], 0.2, 5.0), (i, j)  # nor fails either lattice test
            across_sizes += len(structures[i]) != len(structures[j])
    assert matches >= 80 and across_sizes >= 6  # scaled copies, displaced copies and supercells did match
    assert ruled_out > same_bucket / 4  # the length test spares a good part of the fits
    assert ruled_out_full > ruled_out + (same_bucket - ruled_out) / 2  # and the full test most of the rest


def _scaled(s: Structure, other: Structure) -> Structure:
    """``s`` as ``StructureMatcher._preprocess`` rescales it against ``other`` (both to the volume sqrt(V1 V2))."""
    return Structure(Lattice(s.lattice.matrix * (other.volume / s.volume) ** (1 / 6)), s.species, s.frac_coords)


# ---------------------------------------------------------------- the stage on the database

FAMILIES_CAMPAIGN = {
    "name": "families", "elements": ["Ni", "Al"],
    "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB_tP2_123_a_d", "AB_cF8_225_a_b", "AB_cF8_216_c_a",
                                                      "AB_hP4_194_c_d", "AB_cF16_227_a_b", "AB3_cP4_221_a_c",
                                                      "AB3_cF16_225_a_bc"]}],
    "generate": {"lattice_scales": [0.96, 0.98, 1.0, 1.02, 1.04]},
    "screen": {"mode": "threshold", "max_formation_energy_per_atom": 5.0},
    "funnel": {"engine": "none"},
}


def _families_db(db, tmp_path, seed: int = 3) -> dict[str, float]:
    """The campaign's candidates with made-up predictions (distinct, random): id -> energy."""
    from amdflow.campaign import campaign_from_dict
    from amdflow.ops import add_campaign
    from amdflow.schemas import CandidateState

    cfg = campaign_from_dict({**FAMILIES_CAMPAIGN, "output_dir": str(tmp_path / "out")})
    add_campaign(db, cfg, workflows=False)
    rng = random.Random(seed)
    energies = {}
    for d in db.candidates.find({"campaign": "families"}, {"candidate_id": 1}):
        e = round(rng.uniform(-0.6, 0.2), 6)
        energies[d["candidate_id"]] = e
        db.candidates.update_one({"candidate_id": d["candidate_id"]}, {"$set": {"state": CandidateState.PASSED.value, "prediction": {
            "formation_energy_per_atom": e, "model_id": "test", "model_name": "test", "threshold": 5.0, "passed": True,
            "mode": "threshold"}}})
    return energies


def _partition(db) -> dict[str, str | None]:
    return {c["candidate_id"]: c["dedup"]["duplicate_of"] for c in db.candidates.find({"campaign": "families"})}


def _exa_amd_loop(db) -> dict[str, str | None]:
    """exa-AMD's dedup: per formula, lowest energy first, plain StructureMatcher.fit against the kept list."""
    matcher = StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5.0)
    out: dict[str, str | None] = {}
    by_formula: dict[str, list] = {}
    for c in db.candidates.find({"campaign": "families"}):
        by_formula.setdefault(c["formula"], []).append(c)
    for group in by_formula.values():
        kept: list = []
        for c in sorted(group, key=lambda c: (c["prediction"]["formation_energy_per_atom"], c["candidate_id"])):
            s = Structure.from_dict(c["structure"])
            out[c["candidate_id"]] = next((k[0] for k in kept if matcher.fit(s, k[1])), None)
            if out[c["candidate_id"]] is None:
                kept.append((c["candidate_id"], s))
    return out


def test_batched_dedup_equals_exa_amd_greedy_loop_and_records_buckets(db, tmp_path):
    from amdflow import stages

    energies = _families_db(db, tmp_path)
    outcomes = stages.dedup_many(db, sorted(energies))
    assert not any(o.error for o in outcomes)
    got = _partition(db)
    assert got == _exa_amd_loop(db)
    assert {o.candidate_id: o.duplicate_of for o in outcomes} == got
    kept = [c for c, d in got.items() if d is None]
    assert 6 <= len(kept) < len(got) / 3  # five lattice scales collapse into one family
    docs = list(db.candidates.find({"campaign": "families"}, {"dedup_bucket": 1, "formula": 1, "state": 1}))
    assert {d["state"] for d in docs} == {"unique", "duplicate"}
    assert len({(d["formula"], d["dedup_bucket"]) for d in docs}) > len({d["formula"] for d in docs})  # buckets split formulas
    # a second call decides nothing again: the recorded decisions are returned
    assert [o.duplicate_of for o in stages.dedup_many(db, sorted(energies))] == [got[c] for c in sorted(energies)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_firework_dedup_in_any_order_equals_the_batched_pass(lpad, tmp_path, seed, monkeypatch):
    from amdflow import stages
    from amdflow.db import AmdflowDB

    db = AmdflowDB(lpad)
    db.ensure_indexes()
    energies = _families_db(db, tmp_path)
    order = sorted(energies)
    random.Random(seed).shuffle(order)
    answers = {cid: stages.dedup_stage(db, cid) for cid in order}  # one Firework at a time, in a random order
    got = _partition(db)
    assert answers == got
    assert got == _exa_amd_loop(db)


def test_top_k_keeps_the_k_lowest_of_each_formula_then_dedups_them(db, tmp_path):
    from amdflow import stages
    from amdflow.campaign import campaign_from_dict

    energies = _families_db(db, tmp_path)
    stored = db.campaigns.find_one({"name": "families"})["config"]
    stored["screen"] = {**stored["screen"], "mode": "top_k", "top_k": 4}
    db.campaigns.update_one({"name": "families"}, {"$set": {"config": campaign_from_dict(stored).model_dump(mode="json")}})
    order = sorted(energies, key=lambda c: -energies[c])  # highest first: the worst order for a rank rule
    answers = {cid: stages.dedup_stage(db, cid) for cid in order}
    by_formula: dict[str, list[str]] = {}
    for c in db.candidates.find({"campaign": "families"}):
        by_formula.setdefault(c["formula"], []).append(c["candidate_id"])
    for ids in by_formula.values():
        ranked = sorted(ids, key=lambda c: (energies[c], c))
        assert all(answers[c] == stages.SCREENED_BY_TOP_K for c in ranked[4:])
        assert all(answers[c] != stages.SCREENED_BY_TOP_K for c in ranked[:4])
        assert answers[ranked[0]] is None
