"""Volume rule for substituted cells: scale by summed elemental atomic volumes."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from pymatgen.core import Structure
from pymatgen.core.periodic_table import Element

AVOGADRO = 6.02214076e23


@lru_cache(maxsize=128)
def atomic_volume(symbol: str) -> float:
    """Elemental volume per atom (Angstrom^3) from pymatgen's molar volume.

    Falls back to a sphere of the atomic radius at 68 % packing for the few elements
    without a molar volume (At, Fr, Fm).
    """
    el = Element(symbol)
    mv = el.molar_volume
    if mv is not None:
        return float(mv) * 1e24 / AVOGADRO
    radius = float(el.atomic_radius or 1.5)
    return 4.0 / 3.0 * math.pi * radius**3 / 0.68


def scaled_volume(template: Structure, substituted: Structure) -> float:
    """Template volume times (sum of new atomic volumes) / (sum of template atomic volumes)."""
    old = sum(atomic_volume(site.specie.symbol) for site in template)
    new = sum(atomic_volume(site.specie.symbol) for site in substituted)
    return template.volume * new / old


@lru_cache(maxsize=256)
def covalent_radius(symbol: str) -> float:
    """Covalent radius (Angstrom; Cordero et al., Dalton Trans. 2008, as pymatgen's CovalentRadius holds them), or
    the atomic radius for the heavy elements it lacks."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    radius = CovalentRadius.radius.get(symbol)
    return float(radius if radius is not None else (Element(symbol).atomic_radius or 1.5))


def site_distances(structure: Structure, labels: list[str], site_labels: list[int] | None = None) -> np.ndarray:
    """Shortest distance (Angstrom) between a site of label a and one of label b (periodic images and a site's own
    images included), as a symmetric (L, L) array; inf where none lies within a few neighbour shells.

    Isotropic scaling multiplies every entry by the same factor, so one array per template gives every
    decoration's shortest bond at any scale."""
    n = len(structure)
    if site_labels is None:
        index = {el: i for i, el in enumerate(labels)}
        site_labels = [index[site.specie.symbol] for site in structure]
    cutoff = 2.5 * (structure.volume / n) ** (1.0 / 3.0)
    centres, neighbours, _, dists = structure.get_neighbor_list(cutoff)
    out = np.full((len(labels), len(labels)), np.inf)
    lab = np.asarray(site_labels)
    if len(dists):
        np.minimum.at(out, (lab[centres], lab[neighbours]), dists)
    return np.minimum(out, out.T)


def min_bond_ratio(structure: Structure) -> float:
    """A structure's shortest interatomic distance over the sum of the two atoms' covalent radii (the quantity
    ``generate.min_bond_ratio`` floors; 1.0 is a bond at its covalent length)."""
    labels = sorted({site.specie.symbol for site in structure})
    r = np.array([covalent_radius(el) for el in labels])
    return float(np.min(site_distances(structure, labels) / (r[:, None] + r[None, :])))
