"""The promising/ folder: CIF + POSCAR per candidate and a CSV and JSON summary, written atomically.

The folder is built beside the old one and swapped in with renames, so a reader never
sees a half-written folder and nothing stale survives a refresh.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

SUMMARY_FIELDS = [
    "candidate_id", "formula", "spacegroup", "formation_energy_per_atom", "e_above_hull", "e_above_known_hull",
    "is_stable", "decomposes_to", "predicted_formation_energy_per_atom", "template", "material_id", "cif", "poscar",
]


@dataclass
class PromisingRow:
    """One promising candidate (energies eV/atom)."""

    candidate_id: str
    formula: str
    spacegroup: str
    formation_energy_per_atom: float
    e_above_hull: float
    e_above_known_hull: float | None
    is_stable: bool
    decomposes_to: str
    predicted_formation_energy_per_atom: float | None
    template: str
    material_id: str


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '-', '_', '.')."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".")
    return cleaned or "unnamed"


def write_promising(folder: Path, rows: list[PromisingRow], structures: dict[str, Structure]) -> Path:
    """Replace ``folder`` with CIF/POSCAR files of ``rows`` and ``summary.csv``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        records = []
        for row in rows:
            stem = safe_name(f"{row.formula}_{row.candidate_id}")
            structure = structures[row.candidate_id]
            CifWriter(structure, symprec=0.01).write_file(tmp / f"{stem}.cif")
            Poscar(structure, comment=f"{row.formula} {row.candidate_id} amdflow").write_file(tmp / f"{stem}.vasp")
            records.append({**asdict(row), "cif": f"{stem}.cif", "poscar": f"{stem}.vasp"})
        with open(tmp / "summary.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
            writer.writeheader()
            writer.writerows(records)
        (tmp / "summary.json").write_text(json.dumps(records, indent=1))
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
