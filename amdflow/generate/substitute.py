"""Substitution of target elements into templates, and candidate ids.

Every ordered choice of k target elements for a template with k distinct elements
(``itertools.permutations(targets, k)``): n!/(n-k)! candidates per template, so binary
templates give binary candidates of every pair of targets. Ids are content hashes of
the campaign name and the canonical candidate structure, so generating twice gives the
same ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Structure

from amdflow.campaign import AflowTemplates, CampaignConfig, FolderTemplates
from amdflow.generate.templates import Template, TemplateLog, iter_aflow, iter_folder
from amdflow.generate.volume import scaled_volume
from amdflow.schemas import CandidateDoc, TemplateRef

ID_LENGTH = 24  # hex characters of the sha256 kept in an id (96 bits)


def substitutions(template_elements: list[str], targets: list[str]) -> list[dict[str, str]]:
    """Every assignment of distinct targets to the template's distinct elements."""
    k = len(template_elements)
    return [dict(zip(template_elements, perm, strict=True)) for perm in itertools.permutations(targets, k)]


def canonical_form(structure: Structure) -> dict:
    """Order-independent description: lattice (1e-4 Angstrom) and sorted (Z, frac coords 1e-4)."""
    frac = np.round(np.mod(structure.frac_coords, 1.0), 4) % 1.0
    frac[np.isclose(frac, 1.0)] = 0.0
    frac = frac + 0.0  # no negative zeros
    sites = sorted(
        (site.specie.Z, *(float(f"{x:.4f}") for x in fc)) for site, fc in zip(structure, frac, strict=True)
    )
    lattice = [[float(f"{x:.4f}") + 0.0 for x in row] for row in structure.lattice.matrix]
    return {"lattice": lattice, "sites": sites}


def candidate_id(campaign: str, structure: Structure) -> str:
    """Content hash of the campaign name and the canonical structure."""
    payload = json.dumps({"campaign": campaign, "structure": canonical_form(structure)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:ID_LENGTH]


def substitute(template: Structure, mapping: dict[str, str], scale_volume: bool = True) -> Structure:
    """The template with elements replaced per ``mapping``, optionally rescaled."""
    new = template.copy()
    new.replace_species(mapping)
    if scale_volume:
        new.scale_lattice(scaled_volume(template, new))
    return new


@dataclass
class GenerateReport:
    """What a generation pass read, skipped and made."""

    templates: TemplateLog = field(default_factory=TemplateLog)
    candidates: int = 0


def iter_templates(cfg: CampaignConfig, log: TemplateLog) -> Iterator[Template]:
    n = len(cfg.elements)
    for source in cfg.templates:
        if isinstance(source, AflowTemplates):
            yield from iter_aflow(source, n, log)
        elif isinstance(source, FolderTemplates):
            yield from iter_folder(source, n, log)


def generate_candidates(cfg: CampaignConfig, report: GenerateReport | None = None) -> Iterator[CandidateDoc]:
    """Stream candidate documents for a campaign (one template in memory at a time)."""
    report = report if report is not None else GenerateReport()
    seen: set[str] = set()
    for tmpl in iter_templates(cfg, report.templates):
        template_ref = TemplateRef(source=tmpl.source, template_id=tmpl.template_id,
                                   formula=tmpl.structure.composition.reduced_formula)
        for mapping in substitutions(tmpl.elements, cfg.elements):
            structure = substitute(tmpl.structure, mapping, cfg.generate.scale_volume)
            cid = candidate_id(cfg.name, structure)
            if cid in seen:
                continue
            seen.add(cid)
            comp = structure.composition
            report.candidates += 1
            yield CandidateDoc(
                candidate_id=cid,
                campaign=cfg.name,
                formula=comp.reduced_formula,
                chemsys=comp.chemical_system,
                elements=sorted(el.symbol for el in comp.elements),
                nsites=len(structure),
                structure=structure.as_dict(),
                template=template_ref,
                substitution=mapping,
            )
