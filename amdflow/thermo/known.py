"""Known phases: imported pymatgen entries, so that "new" means new with respect to what is known.

Sources: a folder of pymatgen ``ComputedEntry`` / ``ComputedStructureEntry`` JSON files
(one entry or a list per file, ``.json`` or ``.json.gz``), or the Materials Project through
``mp-api``. Entries are filtered to the campaign's elements and, optionally, to those near
the imported set's own hull, then become ``known`` documents. Whether their energies are
used as they are (``as_is``, mixed only with entries of the declared run type) or their
structures are relaxed with the campaign's engine (``relax``) is the campaign's choice.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymatgen.core import Composition, Element
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

from amdflow.errors import AmdflowError, ConfigError

KNOWN_GLOBS = ("*.json", "*.json.gz")


@dataclass
class KnownImport:
    """Entries read from a source, and (file, reason) for what could not be used."""

    entries: list[tuple[str, ComputedEntry]] = field(default_factory=list)  # (source id, entry)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _safe_id(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.:#+-]", "_", text).strip(".")
    if len(cleaned) > 80:  # keep ids short and unique
        cleaned = cleaned[:60] + "~" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return cleaned or "unnamed"


def read_entry_folder(folder: Path) -> KnownImport:
    """Every ComputedEntry / ComputedStructureEntry in ``folder`` (recursive), with file-relative ids."""
    from monty.serialization import loadfn

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"known phases folder {folder} not found: fix analyze.known_phases.path")
    files = sorted({p for g in KNOWN_GLOBS for p in folder.rglob(g) if p.is_file()})
    if not files:
        raise ConfigError(f"known phases folder {folder} holds no *.json / *.json.gz entry files")
    out = KnownImport()
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            obj = loadfn(path)
        except Exception as err:  # monty/json raise many types on malformed files
            out.skipped.append((rel, f"unreadable ({type(err).__name__}: {err})".replace("\n", " ")[:200]))
            continue
        objs = obj if isinstance(obj, list) else [obj]
        for i, o in enumerate(objs):
            if not isinstance(o, ComputedEntry):
                out.skipped.append((f"{rel}#{i}", f"a {type(o).__name__}, not a pymatgen ComputedEntry"))
                continue
            key = str(o.entry_id) if o.entry_id is not None else (f"{rel}#{i}" if len(objs) > 1 else rel)
            out.entries.append((key, o))
    return out


def mp_entries(chemsys: str, api_key: str | None = None) -> KnownImport:
    """Materials Project entries of ``chemsys`` and its subsystems (mp-api's corrected entries)."""
    from amdflow.settings import get_settings

    key = api_key or get_settings().mp_api_key or os.environ.get("MP_API_KEY")
    if not key:
        raise ConfigError("known phases from the Materials Project need an API key: set AMDFLOW_MP_API_KEY (or MP_API_KEY)")
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise ConfigError("known phases from the Materials Project need mp-api: `pip install 'amdflow[mp]'`") from None
    with MPRester(key) as mpr:
        entries = mpr.get_entries_in_chemsys(chemsys.split("-"))
    return KnownImport(entries=[(str(e.entry_id), e) for e in entries])


def within_own_hull(entries: list[tuple[str, ComputedEntry]], max_e_above_hull: float | None) -> tuple[list[tuple[str, ComputedEntry]], str]:
    """Entries at most ``max_e_above_hull`` (eV/atom) above the hull of the set itself.

    Returns (kept, note). Without every element's reference in the set the filter
    cannot be applied: everything is kept and the note says so.
    """
    if max_e_above_hull is None or not entries:
        return entries, ""
    from pymatgen.analysis.phase_diagram import PhaseDiagram

    elements = sorted({el for _, e in entries for el in e.composition.elements})
    present = {e.composition.elements[0] for _, e in entries if len(e.composition.elements) == 1}
    if set(elements) - present:
        missing = sorted(el.symbol for el in set(elements) - present)
        return entries, f"no elemental entry for {missing}: max_e_above_hull not applied"
    pd = PhaseDiagram([e for _, e in entries], elements=elements)
    kept = [(k, e) for k, e in entries if pd.get_e_above_hull(e, allow_negative=True) <= max_e_above_hull + 1e-9]
    return kept, f"{len(entries) - len(kept)} above {max_e_above_hull} eV/atom of their own hull left out"


def for_elements(entries: Iterable[tuple[str, ComputedEntry]], elements: Iterable[str]) -> list[tuple[str, ComputedEntry]]:
    """Entries made only of ``elements``."""
    allowed = {Element(e) for e in elements}
    return [(k, e) for k, e in entries if set(e.composition.elements) <= allowed]


def known_doc(label: str, key: str, entry: ComputedEntry, run_type: str | None) -> dict[str, Any]:
    """A ``known`` document: energies per atom in eV/atom; ``run_type`` None = energies not used (relax)."""
    comp: Composition = entry.composition
    structure = entry.structure.as_dict() if isinstance(entry, ComputedStructureEntry) else None
    known_id = _safe_id(f"{label}:{key}") + (f"@{_safe_id(run_type)}" if run_type else "")
    return {
        "known_id": known_id,
        "source": f"{label}:{key}",
        "source_id": key,
        "formula": comp.reduced_formula,
        "chemsys": comp.chemical_system,
        "elements": sorted(el.symbol for el in comp.elements),
        "energy_per_atom": float(entry.energy_per_atom),
        "correction_per_atom": float(entry.correction_per_atom),
        "run_type": run_type,
        "structure": structure,
    }


def require_structures(docs: list[dict[str, Any]]) -> None:
    """relax mode needs structures: one error naming the entries that have none."""
    bare = [d["source"] for d in docs if d["structure"] is None]
    if bare:
        shown = ", ".join(bare[:5]) + (f" and {len(bare) - 5} more" if len(bare) > 5 else "")
        raise AmdflowError(f"known phases {shown} have no structure, so they cannot be relaxed: give "
                           "ComputedStructureEntry files, or set analyze.known_phases.energies: as_is with a run_type")
