"""Template sources: pymatgen's AFLOW prototype library and folders of structure files.

Each source yields :class:`Template` objects and records every skipped template with
its reason; nothing is dropped silently.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pymatgen.core import Structure

from amdflow.campaign import AflowTemplates, FolderTemplates
from amdflow.errors import TemplateError

STRUCTURE_GLOBS = ("*.cif", "POSCAR*", "CONTCAR*", "*.vasp")


@dataclass(frozen=True)
class Template:
    """An ordered template structure and where it came from."""

    source: str
    template_id: str
    structure: Structure

    @property
    def elements(self) -> list[str]:
        """Distinct elements in first-appearance order."""
        return list(dict.fromkeys(el.symbol for site in self.structure for el in site.species.elements))


@dataclass
class TemplateLog:
    """Templates read and skipped (with reasons) by a source."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def aflow_library_path() -> Path:
    import pymatgen.analysis.prototypes as protos

    return Path(os.path.dirname(protos.__file__)) / "aflow_prototypes.json.gz"


@lru_cache(maxsize=1)
def aflow_library() -> tuple[tuple[str, Structure], ...]:
    """(AFLOW label, structure) for every prototype in pymatgen's bundled library."""
    from monty.serialization import loadfn

    items = loadfn(aflow_library_path())
    return tuple((it["tags"]["aflow"], it["snl"].structure) for it in items)


def _accept(tmpl: Template, n_targets: int, max_sites: int, log: TemplateLog) -> bool:
    n_el = len(tmpl.elements)
    reason = None
    if not tmpl.structure.is_ordered:
        reason = "disordered or partially occupied"
    elif n_el < 2:
        reason = "fewer than 2 distinct elements"
    elif n_el > n_targets:
        reason = f"{n_el} distinct elements but only {n_targets} target elements"
    elif len(tmpl.structure) > max_sites:
        reason = f"{len(tmpl.structure)} sites > max_sites {max_sites}"
    if reason:
        log.skipped.append((f"{tmpl.source}:{tmpl.template_id}", reason))
        return False
    log.read += 1
    return True


def iter_aflow(cfg: AflowTemplates, n_targets: int, log: TemplateLog) -> Iterator[Template]:
    library = aflow_library()
    if cfg.prototypes is not None:
        known = {label for label, _ in library}
        unknown = [p for p in cfg.prototypes if p not in known]
        if unknown:
            raise TemplateError(
                f"unknown AFLOW prototype label(s) {unknown}: use labels such as 'AB2C_cF16_225_a_c_b' "
                "(see pymatgen's aflow_prototypes.json.gz)"
            )
        wanted = list(dict.fromkeys(cfg.prototypes))
        by_label: dict[str, list[Structure]] = {}
        for label, s in library:
            by_label.setdefault(label, []).append(s)
        selected = [(label, s) for label in wanted for s in by_label[label]]
    else:
        selected = list(library)
    seen: dict[str, int] = {}
    for label, structure in selected:
        # A few labels occur twice in the library (different minerals): number them.
        k = seen[label] = seen.get(label, 0) + 1
        tid = label if k == 1 else f"{label}#{k}"
        tmpl = Template("aflow", tid, structure)
        if _accept(tmpl, n_targets, cfg.max_sites, log):
            yield tmpl


def iter_folder(cfg: FolderTemplates, n_targets: int, log: TemplateLog) -> Iterator[Template]:
    folder = cfg.path
    if not folder.is_dir():
        raise TemplateError(f"template folder {folder} does not exist: fix templates[].path in the campaign file")
    files = sorted({p for pattern in STRUCTURE_GLOBS for p in folder.rglob(pattern) if p.is_file()})
    if not files:
        raise TemplateError(f"template folder {folder} holds no *.cif, POSCAR*, CONTCAR* or *.vasp files: add templates or fix the path")
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_file(path)
        except Exception as err:  # pymatgen raises many types for malformed files
            log.skipped.append((f"folder:{rel}", f"unreadable: {type(err).__name__}: {err}".replace("\n", " ")[:200]))
            continue
        tmpl = Template("folder", rel, structure)
        if _accept(tmpl, n_targets, cfg.max_sites, log):
            yield tmpl
