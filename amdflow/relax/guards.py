"""Guards against the holes of universal potentials: a collapse is a failed relaxation, never a record-low energy.

A universal potential has holes: measured on MP perovskite decorations (scripts/bench_discovery.py),
SevenNet-0 under FIRE + cell filter drove 5 of 192 cells into collapse (down to 0.85 A^3/atom and
-2e25 eV/atom; others at -50 to -98 eV/atom, while no MP element lies below -14.3 eV/atom). A
structure whose volume per atom falls below VOLUME_RATIO_MIN x the smallest of its start, its
elements' own volumes and its atoms' packed covalent spheres, or rises above VOLUME_RATIO_MAX x the
larger of its start and its elements' own volumes (pymatgen's molar volumes: the volume rule gives
some substituted cells a third of that, and they rightly expand), or whose energy falls below
ENERGY_FLOOR_EV_PER_ATOM, ends as :class:`GuardTripped` with that reason.

The covalent term is for ionic compounds of molecular elements: solid H2, O2 or F2 take far more
room per atom than H-, O2- or F- do, so a hydride, oxide or fluoride started at its elements'
volumes (every random-search start is) relaxes to 0.4x of it and more. Measured: 11 of 50 random
KMgH3 starts (SevenNet-0) tripped a collapse bound of 0.5 x 31.3 A^3/atom on their way to MP's
cubic cell at 12.8 A^3/atom; the packed spheres give 12.7, bound 6.4. Real crystals sit at 0.67x
that packed volume and above (checked on 16: W 0.67, Fe 0.73, SrTiO3 0.85, MgO 1.06, NaCl 1.40,
Si 2.64), above the bound's 0.5x; the collapses the guard was made for reach 0.85 A^3/atom.

Every ML engine applies the same guard (SevenNet in flight, in :mod:`amdflow.relax.torchsim_relax`;
CHGNet on its trajectory), and a tripped guard is evidence about the potential, not about the
crystal: the funnel passes such a candidate on flagged ``ml_failed`` (it is never silently
dropped), and an elemental reference falls back to its next structure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pymatgen.core import Structure

from amdflow.generate.volume import atomic_volume, covalent_radius

VOLUME_RATIO_MIN = 0.5
VOLUME_RATIO_MAX = 3.0
ENERGY_FLOOR_EV_PER_ATOM = -25.0
#: Packing fraction of close-packed spheres: the packed covalent volume of an atom is (4/3) pi r_cov^3 / 0.74.
CLOSE_PACKING = 0.74


class GuardTripped(FloatingPointError):
    """A relaxation went unphysical (collapse, blow-up or an energy below any element's): the potential's hole."""


#: Elements whose solids are molecular or van der Waals crystals: a potential without dispersion (PBE-trained ones)
#: binds them barely or not at all, so their cells may expand without bound while the energy stays that of the free
#: molecules (measured: CHGNet's solid F2 went from 18.6 to 56 A^3/atom at -2.02 eV/atom, MP's F is -1.91). Their
#: elemental cells get no blow-up bound; the collapse bound and the energy floor still hold.
MOLECULAR_SOLIDS = frozenset({"H", "N", "O", "F", "Cl", "Br", "I", "He", "Ne", "Ar", "Kr", "Xe", "Rn"})


def volume_bounds(structure: Structure) -> tuple[float, float]:
    """The volume per atom (A^3) a relaxation of ``structure`` may reach before it counts as collapsed or blown up."""
    start = structure.volume / len(structure)
    elemental = sum(atomic_volume(site.specie.symbol) for site in structure) / len(structure)
    packed = sum(packed_covalent_volume(site.specie.symbol) for site in structure) / len(structure)
    symbols = {el.symbol for el in structure.composition.elements}
    high = float("inf") if len(symbols) == 1 and symbols <= MOLECULAR_SOLIDS else VOLUME_RATIO_MAX * max(start, elemental)
    return VOLUME_RATIO_MIN * min(start, elemental, packed), high


def packed_covalent_volume(symbol: str) -> float:
    """Volume per atom (A^3) of close-packed spheres of the element's covalent radius (Cordero 2008)."""
    return 4.0 / 3.0 * math.pi * covalent_radius(symbol) ** 3 / CLOSE_PACKING


def unphysical_reason(bounds: tuple[float, float], volume_per_atom: float, energy_per_atom: float, start_volume: float,
                      steps: int) -> str | None:
    """Why a state is unphysical (None when it is not): the one message every engine gives."""
    low, high = bounds
    if low <= volume_per_atom <= high and energy_per_atom >= ENERGY_FLOOR_EV_PER_ATOM:
        return None
    return (f"the relaxation went unphysical after {steps} steps: {volume_per_atom:.2f} A^3/atom (started at "
            f"{start_volume:.2f}), {energy_per_atom:.4g} eV/atom; the potential has a hole here: not a low-energy crystal")


def check_trajectory(start: Structure, volumes_per_atom: Sequence[float], energies_per_atom: Sequence[float]) -> str | None:
    """The first unphysical step of a finished trajectory (volumes in A^3/atom, energies in eV/atom), or None."""
    bounds = volume_bounds(start)
    start_volume = start.volume / len(start)
    for step, (v, e) in enumerate(zip(volumes_per_atom, energies_per_atom, strict=True)):
        reason = unphysical_reason(bounds, float(v), float(e), start_volume, step)
        if reason is not None:
            return reason
    return None
