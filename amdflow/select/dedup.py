"""Duplicate detection with pymatgen's StructureMatcher, within one reduced formula.

Rule (exa-AMD's greedy dedup, made order-independent): candidates of one campaign and
reduced formula that passed the screen are taken in rank order, (predicted energy,
candidate id); each is a duplicate of the first representative it matches, else it is a
representative itself. So the lowest predicted energy of each family is kept, ties go to
the smaller id, and the outcome does not depend on the order in which dedup Fireworks
run once the family's predictions are in (:mod:`amdflow.stages.dedup` decides a whole
bucket at once, in rank order).

The rule before this one (amdflow 0.1.0, until December 2026) also followed a match with an already-decided *duplicate* to its
representative. That changes the outcome only where ``StructureMatcher`` is not
transitive, and costs a fit against every earlier duplicate for each new representative
(N x D instead of N x R fits), so it was dropped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

# --- Dedup at scale: the matcher's own reduction, done once per structure, and exact buckets -------------------------
#
# What ``StructureMatcher.fit(s1, s2)`` does with amdflow's settings (pymatgen 2026.10, ``core/structure_matcher.py``;
# defaults ``primitive_cell=True``, ``attempt_supercell=False``, ``allow_subset=False``, no ignored species):
#
# 1. ``_process_species``: a plain ``Structure`` copy of each (no species removed).
# 2. composition hashes must be equal (amdflow compares within one reduced formula).
# 3. ``_preprocess``: each structure is replaced by ``_get_reduced_structure(s, primitive_cell, niggli=True)`` (Niggli
#    cell, then ``get_primitive_structure()``); with ``attempt_supercell=False`` the supercell factor ``fu`` is 1; the
#    lattices are rescaled to a common volume (this changes no site count).
# 4. ``_match`` -> ``_strict_match``: the mask has shape (len(s2), len(s1) * fu) = (len(s2), len(s1)), and
#    ``if not self._subset and mask.shape[1] != mask.shape[0]: return None`` -- no match.
#
# So two structures whose reduced cells (step 3) hold different numbers of sites never match: that number is an exact
# invariant, and a formula's candidates split into buckets by it that can be deduplicated independently (and in
# parallel). ``fit(..., skip_structure_reduction=True)`` on structures already reduced by step 3 runs steps 1-4 with step
# 3's reduction skipped, i.e. the same computation: the reduction (a Niggli reduction and a primitive-cell search, the
# larger part of a fit on small cells) is then done once per structure instead of once per pair.
#
# Inside a bucket, a cheap exact test rules out most non-matching pairs before the fit. In step 4, ``fit(s1, s2)`` needs
# a lattice mapping from ``s1.lattice.find_all_mappings(s2.lattice, ltol, angle_tol)`` whose integer matrix has
# determinant +-1 (``_get_lattices`` with supercell size 1): three vectors of s1's lattice forming a basis of it, the
# i-th with length in (L_i / (1 + ltol), L_i * (1 + ltol)) for s2's cell lengths L_i (``core/lattice.py``). Any basis's
# k-th shortest vector is at least the lattice's k-th successive minimum lambda_k, so a match needs
# lambda_k(s1) < (1 + ltol) * sorted(L)_k for k = 1, 2, 3. The successive minima are the Niggli cell's lengths (in 3D a
# Niggli cell is Buerger- and so Minkowski-reduced, whose lengths are the minima). Step 3 scales both cells to one
# volume, so the test compares lengths divided by the cube root of each cell's volume. It is one-sided (s1 is the
# candidate, s2 the representative, as ``greedy_families`` calls ``fit``) and removes about half the fits in a bucket.
#
# The lattice test in full (``may_map_lattice``). With equal site counts ``_match`` calls ``_strict_match(s1, s2)``, whose
# only lattices are ``_get_lattices(s2.lattice, s1, 1)``: ``s1.lattice.find_all_mappings(s2.lattice, ltol, angle_tol)``
# filtered to ``|det(scale_m)|`` within 0.5 of 1. If that yields nothing, the loop over lattices never runs and ``fit``
# is False. ``find_all_mappings`` takes s1's lattice points within ``max(L) * (1 + ltol)`` of the origin, keeps for
# each of s2's lengths L_i those of length in (L_i / (1 + ltol), L_i * (1 + ltol)), then the triples whose pairwise
# angles are within ``angle_tol`` of s2's (alpha between b and c, beta a-c, gamma a-b) and whose integer matrix is
# not singular. Both lattices were rescaled to one volume, so lengths compare as length / V^(1/3) of their own cell,
# and angles and integer coordinates do not change. ``may_map_lattice`` computes the same on each structure's
# lattice points, found once per structure (pymatgen's ``get_points_in_sphere``) instead of once per fit, with a
# slack that can only let a pair through. Measured on the dedup benchmark's largest formula: 85 % of the fits that
# pass the length test fail for want of a lattice, and each of those is a whole ``fit`` (about 1 ms) saved.
#
# All three facts are tested against plain ``StructureMatcher.fit`` on every pair of a generated set
# (tests/test_dedup.py), so a pymatgen release that changes them fails the suite rather than the science.


def dedup_matcher(ltol: float = 0.2, stol: float = 0.3, angle_tol: float = 5.0) -> StructureMatcher:
    """amdflow's matcher: pymatgen's defaults but for the campaign's tolerances."""
    return StructureMatcher(ltol=ltol, stol=stol, angle_tol=angle_tol)


def reduce_for_matching(structure: Structure, matcher: StructureMatcher) -> Structure:
    """The structure ``matcher.fit`` actually compares: its Niggli-reduced primitive cell (step 3 above)."""
    (plain,) = matcher._process_species([structure])
    return matcher._get_reduced_structure(plain, matcher._primitive_cell, True)


def dedup_bucket(reduced: Structure) -> int:
    """Bucket of a reduced structure: its site count; structures in different buckets never match (see above)."""
    return len(reduced)


LATTICE_SLACK = 1e-6  # relative: the lattice test may only err towards fitting (floating point, Niggli's tolerance)
ANGLE_SLACK = 1e-6  # degrees, for the same reason


@dataclass(frozen=True)
class Member:
    """A candidate of one bucket for the greedy pass: rank (predicted energy, id) and its reduced structure."""

    candidate_id: str
    energy: float
    reduced: Structure
    minima: np.ndarray = field(init=False, repr=False)  # successive minima / V^(1/3): the Niggli cell's lengths
    lengths: np.ndarray = field(init=False, repr=False)  # sorted cell lengths / V^(1/3)
    cell: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)  # (a, b, c) / V^(1/3), (alpha, beta, gamma)
    _points: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lattice = self.reduced.lattice
        scale = lattice.volume ** (1 / 3)
        object.__setattr__(self, "lengths", np.sort(lattice.lengths) / scale)
        object.__setattr__(self, "cell", (np.array(lattice.lengths) / scale, np.array(lattice.angles)))
        object.__setattr__(self, "minima", successive_minima(self.points(float(self.lengths[-1]) * (1 + LATTICE_SLACK))))

    @property
    def rank(self) -> tuple[float, str]:
        return (self.energy, self.candidate_id)

    def points(self, radius: float) -> dict[str, np.ndarray]:
        """This cell's lattice points within ``radius`` (in units of V^(1/3)): integer coordinates, vectors, lengths.

        Found with pymatgen's ``get_points_in_sphere`` on the cell scaled to unit volume, once per structure (again
        only if a larger radius is asked for).
        """
        if self._points.get("radius", np.array(-1.0)) < radius:
            from pymatgen.core import Lattice

            lattice = self.reduced.lattice
            unit = Lattice(lattice.matrix / lattice.volume ** (1 / 3))
            radius = radius * 1.25  # room for the next, slightly larger, request
            frac, dist, _, _ = unit.get_points_in_sphere([[0, 0, 0]], [0, 0, 0], radius, zip_results=False)
            frac = np.rint(np.asarray(frac, dtype=float)).astype(np.int64)
            self._points.update(radius=np.array(radius), frac=frac, cart=unit.get_cartesian_coords(frac),
                                dist=np.asarray(dist, dtype=float))
        return self._points


def successive_minima(points: dict[str, np.ndarray]) -> np.ndarray:
    """lambda_1..3 of a lattice from its points within a radius of at least lambda_3 (any cell's longest vector is).

    The shortest non-zero vector, then the shortest not parallel to it, then the shortest out of their plane:
    picked greedily by length, independent vectors give the successive minima (the same numbers as a Niggli cell's
    lengths, which this replaces: 0.07 ms here against 0.4-0.6 ms for ``get_niggli_reduced_lattice``). Independence
    is tested on integer coordinates, so exactly.
    """
    order = np.argsort(points["dist"], kind="stable")
    frac, dist = points["frac"][order], points["dist"][order]
    nonzero = np.flatnonzero(np.any(frac != 0, axis=1))
    first = nonzero[0]
    not_parallel = np.flatnonzero(np.any(np.cross(frac[first], frac) != 0, axis=1))
    second = not_parallel[0]
    third = np.flatnonzero(frac @ np.cross(frac[first], frac[second]) != 0)[0]
    return dist[[first, second, third]]


def may_match(candidate: Member, representative: Member, ltol: float, angle_tol: float | None = None) -> bool:
    """False only if ``fit(candidate, representative)`` cannot be True: the length test, then (given ``angle_tol``)
    the full lattice test (:func:`may_map_lattice`)."""
    if not np.all(candidate.minima < (1 + ltol) * representative.lengths * (1 + LATTICE_SLACK)):
        return False
    return angle_tol is None or may_map_lattice(candidate, representative, ltol, angle_tol)


def _angles(v1: np.ndarray, v2: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    x = np.clip(v1 @ v2.T / l1[:, None] / l2[None, :], -1.0, 1.0)
    return np.rad2deg(np.arccos(x))


def may_map_lattice(candidate: Member, representative: Member, ltol: float, angle_tol: float) -> bool:
    """False only if ``candidate.lattice.find_all_mappings(representative.lattice, ltol, angle_tol)`` (both at one
    volume) yields no mapping of determinant +-1, so that ``fit(candidate, representative)`` is False (see above)."""
    lengths, (alpha, beta, gamma) = representative.cell
    hi = (1 + ltol) * (1 + LATTICE_SLACK)
    pts = candidate.points(float(lengths.max()) * hi)
    dist, cart, frac = pts["dist"], pts["cart"], pts["frac"]
    sel = [(dist < ln * hi) & (dist > ln / hi) for ln in lengths]
    if not all(s.any() for s in sel):
        return False
    (c_a, c_b, c_c), (f_a, f_b, f_c), (l_a, l_b, l_c) = ([x[s] for s in sel] for x in (cart, frac, dist))
    tol = angle_tol + ANGLE_SLACK
    gamma_ok = np.abs(_angles(c_a, c_b, l_a, l_b) - gamma) <= tol  # (a, b)
    beta_ok = np.abs(_angles(c_a, c_c, l_a, l_c) - beta) <= tol  # (a, c)
    alpha_ok = np.abs(_angles(c_b, c_c, l_b, l_c) - alpha) <= tol  # (b, c)
    triples = np.argwhere(gamma_ok[:, :, None] & beta_ok[:, None, :] & alpha_ok[None, :, :])
    if not len(triples):
        return False
    m = np.stack([f_a[triples[:, 0]], f_b[triples[:, 1]], f_c[triples[:, 2]]], axis=1)  # integer: det is exact
    det = (m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
           - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
           + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0]))
    return bool(np.any(np.abs(det) == 1))


@dataclass(frozen=True)
class Decision:
    candidate_id: str
    duplicate_of: str | None
    compared: int


def greedy_families(undecided: Iterable[Member], representatives: Iterable[Member],
                    matcher: StructureMatcher) -> list[Decision]:
    """exa-AMD's greedy rule, in rank order: each candidate is a duplicate of the first representative it matches
    (representatives in rank order), else it becomes a representative.

    ``representatives`` are the bucket's members kept earlier (by an earlier pass); every structure is reduced already
    (:func:`reduce_for_matching`). With every member's prediction in, the outcome depends only on the ranks: the
    lowest (energy, id) of each family is kept, whatever order the Fireworks ran in.
    """
    reps = sorted(representatives, key=lambda m: m.rank)
    decisions = []
    for member in sorted(undecided, key=lambda m: m.rank):
        dup, compared = None, 0
        for rep in reps:
            if not may_match(member, rep, matcher.ltol, matcher.angle_tol):
                continue
            compared += 1
            if matcher.fit(member.reduced, rep.reduced, skip_structure_reduction=True):
                dup = rep.candidate_id
                break
        if dup is None:
            bisect.insort(reps, member, key=lambda m: m.rank)
        decisions.append(Decision(member.candidate_id, dup, compared))
    return decisions
