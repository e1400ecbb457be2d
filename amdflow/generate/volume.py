"""Volume rule for substituted cells: scale by summed elemental atomic volumes."""

from __future__ import annotations

import math
from functools import lru_cache

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
