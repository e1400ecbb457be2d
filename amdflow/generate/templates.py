"""Template sources: AFLOW prototypes (pymatgen), folders of structure files, the
Materials Project (optional ``mp-api``).

A source lists *template items*: small picklable descriptions (a library label, a file
path, or a fetched structure) that a worker process turns into structures. Reading
happens in the workers, so parsing thousands of CIFs runs in parallel. Every template
that cannot be used is recorded with its reason; nothing is dropped silently.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import (
    AflowTemplates,
    CampaignConfig,
    FolderTemplates,
    MPTemplates,
    RandomTemplates,
)
from amdflow.errors import TemplateError

STRUCTURE_GLOBS = ("*.cif", "POSCAR*", "CONTCAR*", "*.vasp", "*.json", "*.json.gz")


@dataclass(frozen=True)
class Template:
    """An ordered template structure and where it came from."""

    source: str
    template_id: str
    structure: Structure

    @functools.cached_property
    def elements(self) -> list[str]:
        """Distinct elements in first-appearance order."""
        return list(dict.fromkeys(el.symbol for site in self.structure for el in site.species.elements))


@dataclass
class TemplateLog:
    """Templates read and skipped (with reasons) by the sources."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: TemplateLog) -> None:
        self.read += other.read
        self.skipped.extend(other.skipped)


@dataclass(frozen=True)
class TemplateItem:
    """What a worker needs to load one template file or library entry (picklable)."""

    kind: str  # "aflow", "file", "structure" or "random"
    source: str  # "aflow", "folder", "mp", "random"
    ref: str  # AFLOW label (+#n), file path, material id, or a random search's composition
    rel: str = ""  # display id for files (path relative to the folder)
    max_sites: int = 64
    payload: Any = None  # a Structure for kind "structure"


def aflow_library_path() -> Path:
    # Found without importing pymatgen.analysis.prototypes: that import decodes the whole
    # library and three Wyckoff tables (measured 2-7 s here) before a single label is read.
    import importlib.util

    spec = importlib.util.find_spec("pymatgen.analysis.prototypes")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - pymatgen is a dependency
        raise TemplateError("pymatgen's AFLOW prototype library is missing: reinstall pymatgen")
    return Path(next(iter(spec.submodule_search_locations))) / "aflow_prototypes.json.gz"


@lru_cache(maxsize=1)
def _aflow_raw() -> dict[str, dict[str, Any]]:
    """Unique id -> the library's undecoded entry (plain JSON: 0.05 s, against 3.5 s to decode all).

    A few AFLOW labels occur twice (different minerals); the second is 'label#2'.
    """
    import gzip
    import json

    seen: dict[str, int] = {}
    out: dict[str, dict[str, Any]] = {}
    with gzip.open(aflow_library_path(), "rt") as fh:
        for it in json.load(fh):
            label = it["tags"]["aflow"]
            k = seen[label] = seen.get(label, 0) + 1
            out[label if k == 1 else f"{label}#{k}"] = it
    return out


def aflow_labels() -> list[str]:
    """Every unique id of pymatgen's bundled AFLOW library, in library order."""
    return list(_aflow_raw())


@dataclass(frozen=True)
class PrototypeInfo:
    """One entry of the AFLOW library as `amdflow prototypes` lists it."""

    label: str
    n_elements: int
    n_sites: int
    strukturbericht: str
    mineral: str


def aflow_catalog() -> list[PrototypeInfo]:
    """Every AFLOW prototype with its element and site counts (read from the plain JSON, nothing decoded)."""
    out = []
    for label, item in _aflow_raw().items():
        sites = item["snl"]["sites"]
        elements = {sp["element"] for site in sites for sp in site["species"]}
        tags = item.get("tags", {})
        sb = str(tags.get("strukturbericht") or "")
        out.append(PrototypeInfo(label, len(elements), len(sites), "" if sb == "None" else sb, str(tags.get("mineral") or "")))
    return out


@functools.cache
def aflow_structure(label: str) -> Structure:
    """One prototype's structure, decoded on first use (as monty's loadfn would decode it)."""
    from monty.json import MontyDecoder

    try:
        item = _aflow_raw()[label]
    except KeyError:
        raise TemplateError(f"AFLOW prototype label '{label}' is not in pymatgen's AFLOW library "
                            "(`amdflow prototypes` lists its labels)") from None
    return MontyDecoder().process_decoded(item["snl"]).structure


def aflow_library() -> tuple[tuple[str, Structure], ...]:
    """(unique id, structure) for every prototype in pymatgen's bundled library."""
    return tuple((label, aflow_structure(label)) for label in aflow_labels())


def aflow_index() -> dict[str, Structure]:
    return dict(aflow_library())


def _aflow_items(cfg: AflowTemplates) -> list[TemplateItem]:
    labels = aflow_labels()
    if cfg.prototypes is None:
        wanted = labels
    else:
        known = set(labels) | {label.split("#")[0] for label in labels}
        unknown = [p for p in cfg.prototypes if p not in known]
        if unknown:
            raise TemplateError(
                f"unknown AFLOW prototype label(s) {unknown}: not in pymatgen's AFLOW library; `amdflow prototypes` "
                "lists its labels (e.g. 'AB2C_cF16_225_a_c_b')"
            )
        chosen = set(cfg.prototypes)
        wanted = [label for label in labels if label in chosen or label.split("#")[0] in chosen]
    return [TemplateItem("aflow", "aflow", label, label, cfg.max_sites) for label in wanted]


def _folder_items(cfg: FolderTemplates) -> list[TemplateItem]:
    folder = cfg.path
    if not folder.is_dir():
        raise TemplateError(f"template folder {folder} does not exist: fix templates[].path in the campaign file")
    files = sorted({p for pattern in STRUCTURE_GLOBS for p in folder.rglob(pattern) if p.is_file()})
    if not files:
        raise TemplateError(
            f"template folder {folder} holds no *.cif, POSCAR*, CONTCAR*, *.vasp or *.json(.gz) files: add templates or fix the path"
        )
    return [TemplateItem("file", "folder", str(p), p.relative_to(folder).as_posix(), cfg.max_sites) for p in files]


def _mp_search(api_key: str, chemsys: list[str] | None, material_ids: list[str] | None) -> list[dict[str, Any]]:
    """Summary docs (material_id, structure) from the Materials Project."""
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise TemplateError("templates from the Materials Project need mp-api: `pip install 'amdflow[mp]'`") from None
    with MPRester(api_key) as mpr:
        docs = mpr.materials.summary.search(chemsys=chemsys, material_ids=material_ids, fields=["material_id", "structure"])
    return [{"material_id": str(d.material_id), "structure": d.structure} for d in docs]


def _mp_items(cfg: MPTemplates) -> list[TemplateItem]:
    key = _mp_key()
    if not key:
        raise TemplateError("templates from the Materials Project need an API key: set AMDFLOW_MP_API_KEY (or MP_API_KEY)")
    docs = _mp_search(key, cfg.chemsys, cfg.material_ids)
    items = []
    for d in sorted(docs, key=lambda d: d["material_id"]):
        s = d["structure"]
        structure = s if isinstance(s, Structure) else Structure.from_dict(s)
        items.append(TemplateItem("structure", "mp", d["material_id"], d["material_id"], cfg.max_sites, structure))
    return items


def check_template_sources(cfg: CampaignConfig) -> None:
    """Raise TemplateError for a source that cannot give templates, before anything is written.

    Local sources are checked whole (folders exist and hold structure files, AFLOW labels
    exist); a Materials Project source only for its API key (no network call here).
    """
    for source in cfg.templates:
        if isinstance(source, AflowTemplates):
            _aflow_items(source)
        elif isinstance(source, FolderTemplates):
            _folder_items(source)
        elif isinstance(source, MPTemplates) and not _mp_key():
            raise TemplateError("templates from the Materials Project need an API key: set AMDFLOW_MP_API_KEY (or MP_API_KEY)")
        elif isinstance(source, RandomTemplates):
            from amdflow.generate.random_search import random_compositions

            random_compositions(cfg.elements, source, cfg.generate.include_subsystems)


def _mp_key() -> str | None:
    from amdflow.settings import get_settings

    return get_settings().mp_api_key or os.environ.get("MP_API_KEY")


def template_items(cfg: CampaignConfig) -> list[TemplateItem]:
    """Every template item of every source of the campaign (no structure parsed yet)."""
    items: list[TemplateItem] = []
    for source in cfg.templates:
        if isinstance(source, AflowTemplates):
            items.extend(_aflow_items(source))
        elif isinstance(source, FolderTemplates):
            items.extend(_folder_items(source))
        elif isinstance(source, MPTemplates):
            items.extend(_mp_items(source))
        elif isinstance(source, RandomTemplates):
            from amdflow.generate.random_search import random_items

            items.extend(random_items(source, cfg))
    return items


def _structures_from_json(path: Path) -> list[tuple[str, Structure]]:
    from monty.serialization import loadfn
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    obj = loadfn(path)
    objs = obj if isinstance(obj, list) else [obj]
    out = []
    for i, o in enumerate(objs):
        if isinstance(o, dict) and o.get("@class") == "Structure":
            o = Structure.from_dict(o)
        if isinstance(o, ComputedStructureEntry):
            out.append((str(o.entry_id) if o.entry_id is not None else str(i), o.structure))
        elif isinstance(o, Structure):
            out.append((str(i), o))
        else:
            raise ValueError(f"item {i} is a {type(o).__name__}, not a Structure or ComputedStructureEntry")
    return out


def load_item(item: TemplateItem) -> tuple[list[Template], list[tuple[str, str]]]:
    """Templates from one item, and (template, reason) for what could not be read."""
    if item.kind == "aflow":
        return [Template("aflow", item.ref, aflow_structure(item.ref))], []
    if item.kind == "structure":
        return [Template(item.source, item.ref, item.payload)], []
    path = Path(item.ref)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.name.endswith((".json", ".json.gz")):
                pairs = _structures_from_json(path)
                many = len(pairs) > 1
                return [Template(item.source, f"{item.rel}#{key}" if many else item.rel, s) for key, s in pairs], []
            return [Template(item.source, item.rel, Structure.from_file(path))], []
    except Exception as err:  # pymatgen raises many types for malformed files
        reason = f"unreadable ({type(err).__name__}: {err})".replace("\n", " ")[:200]
        return [], [(f"{item.source}:{item.rel}", reason)]


def iter_templates(cfg: CampaignConfig, log: TemplateLog) -> Iterator[Template]:
    """Templates of all sources, read in this process (for small jobs and tools)."""
    for item in template_items(cfg):
        templates, skipped = load_item(item)
        log.skipped.extend(skipped)
        yield from templates
