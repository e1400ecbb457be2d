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
    if n_labels == 1:
        return (identity,)
    cell = (lattice, frac, np.ones(len(frac), dtype=int))
    sym = spglib.get_symmetry(cell, symprec=symprec)
    if sym is None:
        return (identity,)
    perms = {identity}
    tol_frac = symprec / np.linalg.norm(lattice, axis=1).min() * 2
    counts = np.bincount(site_labels, minlength=n_labels)
    for rot, trans in zip(sym["rotations"], sym["translations"], strict=True):
        mapped = frac @ rot.T + trans
        diff = mapped[:, None, :] - frac[None, :, :]
        diff -= np.rint(diff)
        dist = np.abs(diff).max(axis=2)
        target = dist.argmin(axis=1)
        if dist[np.arange(len(frac)), target].max() > tol_frac:
            continue  # not a clean site permutation at this tolerance
        pairs = np.unique(np.stack([site_labels, site_labels[target]], axis=1), axis=0)
        if len(pairs) != n_labels or len(np.unique(pairs[:, 1])) != n_labels:
            continue  # mixes labels: not a colour symmetry
        perm = [0] * n_labels
        for a, b in pairs:
            perm[a] = int(b)
        if all(counts[a] == counts[perm[a]] for a in range(n_labels)):
            perms.add(tuple(perm))
    return tuple(sorted(perms))


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
