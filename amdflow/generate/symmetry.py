"""Symmetry-equivalent decorations of a template, from its colour symmetry.

Take the template's skeleton (every site the same species) and its space-group
operations (spglib). An operation that sends every site of template element ``i`` onto a
site of template element ``p[i]`` (the same ``p`` for all sites) is a *colour symmetry*
with label permutation ``p``. Two assignments of targets to the template's elements,
``tau`` and ``tau o p``, then give the same crystal: the operation maps one onto the
other. Conversely, any isometry between two decorations of one skeleton is a skeleton
operation inducing such a ``p``, so the orbits of the assignments under this group are
exactly the distinct decorations. One representative per orbit is kept (the smallest
assignment tuple in target order).

Examples: B2 (CsCl) has p = (B A) (a translation), so AB and BA are one candidate;
L2_1 Heusler X2YZ has (Y Z); half-Heusler XYZ has one transposition, leaving 3 of 6
assignments; L1_2 A3B and the cubic perovskite have none.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

DEFAULT_SYMPREC = 0.01  # Angstrom, spglib's distance tolerance


def colour_symmetry(lattice: np.ndarray, frac: np.ndarray, site_labels: np.ndarray, symprec: float = DEFAULT_SYMPREC) -> tuple[tuple[int, ...], ...]:
    """Label permutations induced by the skeleton's symmetry operations (identity included)."""
    import spglib

    n_labels = int(site_labels.max()) + 1
    identity = tuple(range(n_labels))
    counts = np.bincount(site_labels, minlength=n_labels)
    if len(set(counts.tolist())) == n_labels:
        return (identity,)  # a colour permutation maps labels of equal counts: none here
    if not _swappable_pairs(lattice, frac, site_labels, counts):
        return (identity,)  # no two labels of equal count have the same environments
    cell = (lattice, frac, np.ones(len(frac), dtype=int))
    sym = spglib.get_symmetry(cell, symprec=symprec)
    if sym is None:
        return (identity,)
    rotations, translations = sym["rotations"], sym["translations"]
    tol_frac = symprec / np.linalg.norm(lattice, axis=1).min() * 2
    n = len(frac)
    # all operations at once: mapped[o, i] is site i moved by operation o
    mapped = np.einsum("oij,nj->oni", rotations, frac) + translations[:, None, :]
    target = np.empty((len(rotations), n), dtype=np.int64)
    ok = np.ones(len(rotations), dtype=bool)
    for start in range(0, n, 64):  # chunks of sites bound the (ops x chunk x n x 3) array
        diff = mapped[:, start : start + 64, None, :] - frac[None, None, :, :]
        diff -= np.rint(diff)
        dist = np.abs(diff).max(axis=3)
        idx = dist.argmin(axis=2)
        target[:, start : start + 64] = idx
        ok &= np.take_along_axis(dist, idx[..., None], axis=2)[..., 0].max(axis=1) <= tol_frac
    # an operation is a colour symmetry if each label maps to one label, bijectively
    mapped_labels = site_labels[target]  # (ops, n)
    perm = np.full((len(rotations), n_labels), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(rotations)), n)
    perm[rows, np.tile(site_labels, len(rotations))] = mapped_labels.ravel()
    consistent = (np.take_along_axis(perm, np.broadcast_to(site_labels, target.shape), axis=1) == mapped_labels).all(axis=1)
    bijective = np.array([len(set(p.tolist())) == n_labels for p in perm])
    same_counts = (counts[perm.clip(min=0)] == counts[None, :]).all(axis=1)
    perms = {identity} | {tuple(int(x) for x in p) for p in perm[ok & consistent & bijective & same_counts]}
    return tuple(sorted(perms))


def _swappable_pairs(lattice: np.ndarray, frac: np.ndarray, site_labels: np.ndarray, counts: np.ndarray,
                     n_nearest: int = 6) -> list[tuple[int, int]]:
    """Label pairs (equal counts) whose sites have the same sorted neighbour distances.

    An isometry maps a site to one with the same distances to its nearest neighbours, so
    labels whose distance signatures differ can never be swapped: a cheap exact test that
    spares spglib for most templates. The distances are taken in the LLL-reduced basis
    over the 3x3x3 block of cells, which holds every neighbour closer than the smallest
    cell height; when some site's n-th neighbour is farther, the test gives up and every
    equal-count pair is returned (spglib decides).
    """
    n_labels = len(counts)
    equal = [(a, b) for a in range(n_labels) for b in range(a + 1, n_labels) if counts[a] == counts[b]]
    if not equal:
        return []
    from pymatgen.core import Lattice

    lll = Lattice(lattice).lll_matrix
    cart = frac @ lattice
    f_lll = np.mod(cart @ np.linalg.inv(lll), 1.0)
    cart = f_lll @ lll
    shifts = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)
    images = ((f_lll[None, :, :] + shifts[:, None, :]).reshape(-1, 3)) @ lll
    dist = np.linalg.norm(cart[:, None, :] - images[None, :, :], axis=2)
    dist.sort(axis=1)
    m = min(n_nearest, dist.shape[1] - 1)
    near = dist[:, 1 : m + 1]  # column 0 is the site itself
    volume = abs(np.linalg.det(lll))
    heights = [volume / np.linalg.norm(np.cross(lll[(i + 1) % 3], lll[(i + 2) % 3])) for i in range(3)]
    if near[:, -1].max() > min(heights) - 1e-6:
        return equal  # signatures might be incomplete: let spglib decide
    rounded = np.round(near, 3)
    signature = {a: sorted(map(tuple, rounded[site_labels == a].tolist())) for a in range(n_labels)}
    return [(a, b) for a, b in equal if signature[a] == signature[b]]


def distinct_assignments(n_labels: int, targets: Sequence[str], group: Sequence[tuple[int, ...]],
                         include_subsystems: bool = True) -> tuple[list[tuple[str, ...]], int]:
    """(one assignment per symmetry orbit, number of assignments before reduction).

    An assignment gives the target element of each template label. With
    ``include_subsystems`` every k-subset of the targets is used; otherwise only
    templates with as many elements as targets yield candidates.
    """
    if n_labels > len(targets) or (not include_subsystems and n_labels != len(targets)):
        return [], 0
    rank = {t: i for i, t in enumerate(targets)}
    kept: list[tuple[str, ...]] = []
    total = 0
    for tau in itertools.permutations(targets, n_labels):
        total += 1
        key = tuple(rank[t] for t in tau)
        if all(key <= tuple(key[p[i]] for i in range(n_labels)) for p in group):
            kept.append(tau)
    return kept, total
