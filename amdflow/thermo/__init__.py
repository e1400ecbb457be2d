"""Formation energies and convex hulls (pure functions over plain inputs)."""

from amdflow.thermo.hull import (
    EntryKind,
    HullEntry,
    HullResult,
    formation_energy_per_atom,
    hull_analysis,
    reference_energies,
)

__all__ = ["EntryKind", "HullEntry", "HullResult", "formation_energy_per_atom", "hull_analysis", "reference_energies"]
