"""``amdflow export``: a campaign's tables, structures and pymatgen entries written to files, atomically.

A file is written beside its target and renamed onto it; a folder of structures is built
beside the target folder and swapped in (``amdflow.report.export._swap_in``). A reader
never sees a half-written file, and a failed export (disk full) leaves the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amdflow.errors import AmdflowError
from amdflow.report.export import _swap_in, safe_name

if TYPE_CHECKING:
    from amdflow.api import Campaign

WHAT = ("thermo", "candidates", "tasks", "structures")
FORMATS = {
    "thermo": ("csv", "json", "entries"),
    "candidates": ("csv", "json"),
    "tasks": ("csv", "json", "entries"),
    "structures": ("cif", "poscar", "extxyz", "json"),
}


def check_request(what: str, fmt: str) -> None:
    """One line naming the allowed choices, before anything is read."""
    if what not in FORMATS:
        raise AmdflowError(f"--what {what}: choose {', '.join(WHAT)}")
    if fmt not in FORMATS[what]:
        raise AmdflowError(f"--what {what} --format {fmt}: {what} export as {', '.join(FORMATS[what])}")


def export(camp: Campaign, what: str, fmt: str, out: Path, stable: bool | None = None, max_e_above_hull: float | None = None,
           state: list[str] | None = None, run_type: str | None = None) -> dict[str, Any]:
    """Write the selection; returns what was written (``path``, ``count``)."""
    check_request(what, fmt)
    out = Path(out)
    hull_filter = stable is not None or max_e_above_hull is not None
    if what == "thermo":
        if fmt == "entries":
            entries = camp.entries(run_type, stable=stable, max_e_above_hull=max_e_above_hull)
            return {"path": str(_write_entries(entries, out)), "count": len(entries)}
        table = camp.thermo(stable, max_e_above_hull, run_type)
        if state:
            table = table[table["candidate_id"].isin(set(camp.candidates(state=state)["candidate_id"]))]
        return {"path": str(_write_table(table, fmt, out)), "count": len(table)}
    if what == "tasks":
        if fmt == "entries":
            entries = camp.entries(run_type, stable=stable, max_e_above_hull=max_e_above_hull)
            return {"path": str(_write_entries(entries, out)), "count": len(entries)}
        table = camp.tasks(run_type)
        if hull_filter:
            keep = set(camp.thermo(stable, max_e_above_hull, run_type)["material_id"])
            table = table[table["task_id"].isin(keep)]
        return {"path": str(_write_table(table, fmt, out)), "count": len(table)}
    table = camp.candidates(state=state)
    if hull_filter:
        keep = set(camp.thermo(stable, max_e_above_hull, run_type, kinds=("candidate",))["candidate_id"])
        table = table[table["candidate_id"].isin(keep)]
    if what == "candidates":
        return {"path": str(_write_table(table, fmt, out)), "count": len(table)}
    rows = table.to_dict("records")
    return {"path": str(_write_structures(camp, rows, fmt, out)), "count": len(rows)}


# ---------------------------------------------------------------------- writers
def _atomic_file(out: Path, write: Any) -> Path:
    """``write(tmp_path)``, then rename onto ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _export_error(out, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _export_error(path: Path, err: OSError) -> AmdflowError:
    why = err.strerror or type(err).__name__
    return AmdflowError(f"could not write {path} ({why}): free disk space or fix permissions in {Path(path).parent}, then run "
                        "the export again; the previous file is unchanged and the results are in the database")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, float) and value != value:  # NaN (pandas' missing number) -> null
        return None
    return value


def _write_table(table: Any, fmt: str, out: Path) -> Path:
    if fmt == "csv":
        def write(tmp: Path) -> None:
            frame = table.copy()
            for col in frame.columns:  # lists and dicts (decomposes_to) as JSON text, not Python repr
                if frame[col].map(lambda v: isinstance(v, (list, dict))).any():
                    frame[col] = frame[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
            frame.to_csv(tmp, index=False)
    else:
        def write(tmp: Path) -> None:
            records = [{k: _jsonable(v) for k, v in r.items()} for r in table.to_dict("records")]
            tmp.write_text(json.dumps(records, indent=1, default=str) + "\n")
    return _atomic_file(out, write)


def _write_entries(entries: list[Any], out: Path) -> Path:
    """pymatgen JSON (``MontyEncoder``): ``json.load`` + ``MontyDecoder`` give the entries back, PhaseDiagram takes them."""
    from monty.json import MontyEncoder

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(entries, cls=MontyEncoder) + "\n")

    return _atomic_file(out, write)


def _write_structures(camp: Campaign, rows: list[dict[str, Any]], fmt: str, out: Path) -> Path:
    """cif / poscar: a folder of one file per candidate; extxyz / json: one file of every structure."""
    structures = [(r, camp.structure(r["candidate_id"])) for r in rows]
    if fmt == "extxyz":
        from ase.io import write as ase_write
        from pymatgen.io.ase import AseAtomsAdaptor

        frames = []
        for r, s in structures:
            atoms = AseAtomsAdaptor.get_atoms(s)
            atoms.info.update({k: v for k, v in _frame_info(r).items() if v is not None})
            frames.append(atoms)
        return _atomic_file(out, lambda tmp: ase_write(str(tmp), frames, format="extxyz"))
    if fmt == "json":
        payload = [{"candidate_id": r["candidate_id"], **_frame_info(r), "structure": s.as_dict()} for r, s in structures]
        return _atomic_file(out, lambda tmp: tmp.write_text(json.dumps(payload, default=str) + "\n"))
    from pymatgen.io.cif import CifWriter
    from pymatgen.io.vasp import Poscar

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for r, s in structures:
            stem = safe_name(f"{r['candidate_id']}_{r['formula']}")
            if fmt == "cif":
                CifWriter(s, symprec=0.01).write_file(str(tmp / f"{stem}.cif"))
            else:
                Poscar(s, comment=f"{r['formula']} {r['candidate_id']}").write_file(str(tmp / f"{stem}.POSCAR"))
        _swap_in(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _export_error(out, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _frame_info(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("candidate_id", "formula", "state", "predicted_formation_energy_eV_per_atom", "formation_energy_eV_per_atom",
            "e_above_hull_eV_per_atom", "task_id")
    return {k: _jsonable(r.get(k)) for k in keys}
