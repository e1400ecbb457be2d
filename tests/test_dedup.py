from __future__ import annotations

import itertools

from pymatgen.core import Lattice, Structure

from amdflow.select import Peer, find_representative


def b2(a=2.9, swap=False):
    species = ["Al", "Fe"] if swap else ["Fe", "Al"]
    return Structure(Lattice.cubic(a), species, [[0, 0, 0], [0.5, 0.5, 0.5]])


def l12():
    return Structure(Lattice.cubic(3.7), ["Al", "Fe", "Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def test_lower_energy_match_wins():
    peers = [Peer("b", -0.5, b2(swap=True)), Peer("c", -0.9, l12())]
    # b2 with Fe/Al swapped is the same structure (translation): duplicate of the lower-energy "b"
    assert find_representative("a", -0.3, b2(), peers) == ("b", 2)
    # with a lower energy itself, "a" is kept
    assert find_representative("a", -0.6, b2(), peers) == (None, 1)


def test_scaled_cell_matches_and_ties_go_to_smaller_id():
    peers = [Peer("b", -0.5, b2(a=3.1))]
    assert find_representative("c", -0.5, b2(), peers)[0] == "b"
    assert find_representative("a", -0.5, b2(), peers)[0] is None


def test_follows_representative_of_duplicate_peer():
    peers = [Peer("b", -0.5, b2(), representative="z")]
    assert find_representative("c", -0.1, b2(swap=True), peers)[0] == "z"


def test_order_independent_outcome():
    family = {"a": -0.2, "b": -0.7, "c": -0.4}
    structures = {"a": b2(), "b": b2(a=3.0, swap=True), "c": b2(a=2.8)}
    for order in itertools.permutations(family):
        kept = []
        for cid in order:
            peers = [Peer(o, family[o], structures[o]) for o in family if o != cid]
            dup, _ = find_representative(cid, family[cid], structures[cid], peers)
            if dup is None:
                kept.append(cid)
        assert kept == ["b"]
