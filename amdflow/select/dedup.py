"""Duplicate detection with pymatgen's StructureMatcher, within one reduced formula.

Rule: among candidates of the same campaign and reduced formula that passed the
screen, a candidate is a duplicate of the lowest-energy candidate it matches that
ranks before it, where candidates rank by (predicted energy, candidate id). So the
lowest predicted energy of each family is kept, ties go to the smaller id, and the
outcome does not depend on the order in which dedup steps run once the family's
predictions are in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure


@dataclass(frozen=True)
class Peer:
    """Another candidate of the same formula: id, predicted energy, structure."""

    candidate_id: str
    energy: float
    structure: Structure
    representative: str | None = None  # set when the peer is itself a known duplicate


def find_representative(
    candidate_id: str,
    energy: float,
    structure: Structure,
    peers: Iterable[Peer],
    ltol: float = 0.2,
    stol: float = 0.3,
    angle_tol: float = 5.0,
) -> tuple[str | None, int]:
    """(id of the candidate this one duplicates, or None; number of peers compared)."""
    rank = (energy, candidate_id)
    ahead = sorted((p for p in peers if (p.energy, p.candidate_id) < rank), key=lambda p: (p.energy, p.candidate_id))
    if not ahead:
        return None, 0
    matcher = StructureMatcher(ltol=ltol, stol=stol, angle_tol=angle_tol)
    for n, peer in enumerate(ahead, start=1):
        if matcher.fit(structure, peer.structure):
            return peer.representative or peer.candidate_id, n
    return None, len(ahead)
