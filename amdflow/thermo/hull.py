"""Convex-hull analysis with pymatgen's PhaseDiagram.

Inputs are plain (formula, energy per atom); every entry of a chemical system and its
subsystems goes into one hull, so candidates lower the hull for each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from pymatgen.analysis.phase_diagram import PhaseDiagram
from pymatgen.core import Composition, Element
from pymatgen.entries.computed_entries import ComputedEntry

from amdflow.errors import AmdflowError

STABLE_TOL = 1e-8  # eV/atom: at most this far above the hull counts as on it
#: eV/atom: a compound whose formation energy lies below this is a hole of the potential (or a broken calculation),
#: not a crystal: it is placed but does not shape the hull. MP's most strongly bound compounds, fluorides and oxides,
#: lie near -4 eV/atom (the stable perovskite fluorides of ../shared: RbYbF3 -3.89); measured holes lie far below
#: (a SevenNet-0 Pb3 triangle at 2.15 A: -15.8 eV/atom against fcc Pb), and one such entry on a hull would put every
#: real candidate of its system above it.
FORMATION_ENERGY_FLOOR = -5.0


class EntryKind(StrEnum):
    """Where a phase came from. Only candidates are left out of the 'known' hull."""

    CANDIDATE = "candidate"  # relaxed amdflow candidate
    REFERENCE = "reference"  # elemental reference relaxed by amdflow
    KNOWN = "known"  # imported known phase (relaxed by amdflow, or energy imported as is)


@dataclass(frozen=True)
class HullEntry:
    """One phase: an id, a formula and an energy per atom (eV/atom).

    ``in_hull=False`` places the entry against the hull without letting it shape the
    hull (an unconverged relaxation, say).
    """

    entry_id: str
    formula: str
    energy_per_atom: float
    kind: EntryKind = EntryKind.CANDIDATE
    in_hull: bool = True
    data: Mapping[str, object] = field(default_factory=dict)

    def to_computed_entry(self) -> ComputedEntry:
        comp = Composition(self.formula)
        return ComputedEntry(comp, self.energy_per_atom * comp.num_atoms, entry_id=self.entry_id)


@dataclass(frozen=True)
class HullResult:
    """Hull position of one entry (energies eV/atom).

    ``e_above_hull`` is measured against the hull of every computed phase (candidates
    lower it for each other); ``e_above_known_hull`` against the references and known
    phases only, so a negative value means below everything known: a new stable phase.
    """

    entry_id: str
    formula: str
    energy_per_atom: float
    formation_energy_per_atom: float
    e_above_hull: float
    is_stable: bool
    decomposes_to: list[dict[str, object]]
    kind: EntryKind = EntryKind.CANDIDATE
    in_hull: bool = True
    e_above_known_hull: float | None = None


def reference_energies(entries: Iterable[HullEntry]) -> dict[str, float]:
    """Lowest energy per atom of each element among elemental entries."""
    refs: dict[str, float] = {}
    for e in entries:
        comp = Composition(e.formula)
        if len(comp.elements) == 1:
            el = comp.elements[0].symbol
            refs[el] = min(refs.get(el, float("inf")), e.energy_per_atom)
    return refs


def formation_energy_per_atom(formula: str, energy_per_atom: float, refs: Mapping[str, float]) -> float:
    """E_f = E/atom - sum_i x_i E_ref,i (eV/atom); raises if a reference is missing."""
    comp = Composition(formula)
    missing = [el.symbol for el in comp.elements if el.symbol not in refs]
    if missing:
        raise AmdflowError(f"no elemental reference energy for {missing}: relax the reference workflow first")
    frac = comp.fractional_composition
    return energy_per_atom - sum(frac[el] * refs[el.symbol] for el in comp.elements)


def is_hole(formula: str, energy_per_atom: float, refs: Mapping[str, float]) -> bool:
    """Whether a compound's formation energy lies below :data:`FORMATION_ENERGY_FLOOR` (elements never are)."""
    comp = Composition(formula)
    if len(comp.elements) < 2 or any(el.symbol not in refs for el in comp.elements):
        return False
    return formation_energy_per_atom(formula, energy_per_atom, refs) < FORMATION_ENERGY_FLOOR


def _clean(e_hull: float) -> float:
    return max(float(e_hull), 0.0) if abs(e_hull) < STABLE_TOL else float(e_hull)


def hull_analysis(entries: Iterable[HullEntry], elements: Iterable[str] | None = None) -> list[HullResult]:
    """Build one PhaseDiagram over ``entries`` and place every entry on it.

    Entries with ``in_hull=False`` are placed but do not shape the hull (their
    e_above_hull may be negative), and neither do compounds below :data:`FORMATION_ENERGY_FLOOR`
    (holes of a potential: their result says ``in_hull=False``). A second diagram over the references and known
    phases gives ``e_above_known_hull``.
    """
    entries = list(entries)
    computed = [e.to_computed_entry() for e in entries]
    els = sorted(set(elements) if elements else {el.symbol for c in computed for el in c.composition.elements})
    refs = reference_energies(e for e in entries if e.in_hull)
    missing = [el for el in els if el not in refs]
    if missing:
        raise AmdflowError(f"no elemental reference for {missing} in {'-'.join(els)}: relax the reference workflow first")
    entries = [replace(e, in_hull=False) if e.in_hull and is_hole(e.formula, e.energy_per_atom, refs) else e for e in entries]
    shaping = [e for e in entries if e.in_hull]
    elements_obj = [Element(el) for el in els]
    pd = PhaseDiagram([c for e, c in zip(entries, computed, strict=True) if e.in_hull], elements=elements_obj)
    known_pd = None
    known = [c for e, c in zip(entries, computed, strict=True) if e.in_hull and e.kind != EntryKind.CANDIDATE]
    if not [el for el in els if el not in reference_energies(e for e in shaping if e.kind != EntryKind.CANDIDATE)]:
        known_pd = PhaseDiagram(known, elements=elements_obj)
    stable_ids = {e.entry_id for e in pd.stable_entries}
    results = []
    for hull_entry, entry in zip(entries, computed, strict=True):
        decomp, e_hull = pd.get_decomp_and_e_above_hull(entry, allow_negative=True)
        e_hull = _clean(e_hull)
        e_known = None
        if known_pd is not None:
            e_known = _clean(known_pd.get_decomp_and_e_above_hull(entry, allow_negative=True)[1])
        results.append(
            HullResult(
                entry_id=hull_entry.entry_id,
                formula=entry.composition.reduced_formula,
                energy_per_atom=hull_entry.energy_per_atom,
                formation_energy_per_atom=float(pd.get_form_energy_per_atom(entry)),
                e_above_hull=e_hull,
                is_stable=hull_entry.in_hull and (entry.entry_id in stable_ids or e_hull <= STABLE_TOL),
                decomposes_to=[
                    {"material_id": d.entry_id, "formula": d.composition.reduced_formula, "fraction": float(x)}
                    for d, x in sorted(decomp.items(), key=lambda kv: -kv[1])
                ],
                kind=hull_entry.kind,
                in_hull=hull_entry.in_hull,
                e_above_known_hull=e_known,
            )
        )
    return results


def predicted_e_above_hull(formula: str, formation_energy_per_atom: float,
                           phases: Iterable[tuple[str, float]], elements: Iterable[str]) -> float:
    """Energy (eV/atom) of a predicted formation energy above the hull of known phases.

    ``phases`` are (formula, formation energy per atom) of computed materials; every
    element of ``elements`` is on the hull at 0. Negative means below the current hull.
    """
    from pymatgen.analysis.phase_diagram import PDEntry

    entries = [PDEntry(Composition(el), 0.0) for el in elements]
    for f, ef in phases:
        comp = Composition(f)
        entries.append(PDEntry(comp, ef * comp.num_atoms))
    pd = PhaseDiagram(entries)
    comp = Composition(formula)
    _, e_hull = pd.get_decomp_and_e_above_hull(PDEntry(comp, formation_energy_per_atom * comp.num_atoms), allow_negative=True)
    return float(e_hull)


def chemsys_of(formula: str) -> str:
    return "-".join(sorted(el.symbol for el in Composition(formula).elements))


def subsystems(chemsys: str) -> list[str]:
    """Every non-empty subsystem of 'A-B-C' (including itself), sorted names."""
    import itertools

    els = sorted(chemsys.split("-"))
    return ["-".join(c) for k in range(1, len(els) + 1) for c in itertools.combinations(els, k)]
