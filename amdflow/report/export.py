"""The promising/ folder: CIF + POSCAR per candidate and a CSV and JSON summary, written atomically.

The folder is built beside the old one and swapped in with renames, so a reader never
sees a half-written folder and nothing stale survives a refresh.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from amdflow.errors import AmdflowError

SUMMARY_FIELDS = [
    "candidate_id", "formula", "spacegroup", "formation_energy_per_atom", "e_above_hull", "e_above_known_hull",
    "is_stable", "decomposes_to", "predicted_formation_energy_per_atom", "template", "material_id", "min_bond_ratio",
    "cif", "poscar",
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
    min_bond_ratio: float | None = None  # the candidate's shortest bond over the summed covalent radii, as generated


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '-', '_', '.')."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".")
    return cleaned or "unnamed"


def output_error(path: Path, err: OSError) -> AmdflowError:
    """One line for a failed output write (disk full, permissions): what, where, how to fix, nothing lost."""
    why = err.strerror or type(err).__name__
    return AmdflowError(f"could not write {path} ({why}): free disk space or fix permissions in {Path(path).parent}, then run "
                        "`amdflow report`; the previous version is unchanged and the hull data are in the database")


def _swap_in(tmp: Path, folder: Path, attempts: int = 20) -> None:
    """Move the finished ``tmp`` folder to ``folder``, replacing what is there.

    Two analyze steps may swap at the same moment (several nodes, one file system): each
    moves the current folder aside under its own unique name and retries, so one of them
    wins, neither fails and no old folder is left behind.
    """
    for _ in range(attempts):
        try:
            os.rename(tmp, folder)  # only onto a missing (or empty) folder
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, old)
        except FileNotFoundError:  # another process moved it first: try again
            continue
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(errno.EBUSY, f"{folder} kept changing while being replaced")


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
        _swap_in(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(folder, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
