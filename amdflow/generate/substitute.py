"""Substitution of target elements into templates, streamed and in parallel.

Per template (in a worker process): read it, check it against the filters, find its
colour symmetry (:mod:`amdflow.generate.symmetry`), then for every distinct assignment
of targets and every lattice scale build the candidate document directly from numpy
arrays. Only one template's arrays are in memory per worker, and documents leave in
bounded batches, so a million candidates are never a million Structures.

Candidate ids are content hashes of the campaign name and the canonical structure
(lattice and (Z, fractional coordinates) rounded to 1e-4, sites sorted), so generating
twice gives the same ids and the database's unique index turns reruns into no-ops.

The document builder writes the same dict as ``Structure.as_dict(verbosity=0)`` (a test
checks the round trip with ``Structure.from_dict``). Measured here: building it from
arrays takes a few microseconds per candidate against ~290 us for copy +
replace_species + scale_lattice + as_dict in pymatgen, which is why we do not go through
a Structure per candidate (scripts/bench_generate.py, BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Structure
from pymatgen.core.periodic_table import Element

from amdflow.campaign import CampaignConfig, GenerateConfig
from amdflow.generate.symmetry import colour_symmetry, distinct_assignments
from amdflow.generate.templates import (
    Template,
    TemplateItem,
    TemplateLog,
    load_item,
    template_items,
)
from amdflow.generate.volume import atomic_volume, covalent_radius, scaled_volume, site_distances

ID_LENGTH = 24  # hex characters of the sha256 kept in an id (96 bits)
_CODEC = None  # set on first use: BSON codec options keeping datetimes timezone-aware


def _codec() -> Any:
    global _CODEC
    if _CODEC is None:
        from bson.codec_options import CodecOptions

        _CODEC = CodecOptions(tz_aware=True, tzinfo=UTC)
    return _CODEC


def _raw_codec() -> Any:
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument

    return CodecOptions(document_class=RawBSONDocument, tz_aware=True, tzinfo=UTC)
WINDOW_PER_WORKER = 4  # templates in flight per worker (bounds memory)


def substitutions(template_elements: list[str], targets: list[str]) -> list[dict[str, str]]:
    """Every assignment of distinct targets to the template's distinct elements (no reduction)."""
    import itertools

    k = len(template_elements)
    return [dict(zip(template_elements, perm, strict=True)) for perm in itertools.permutations(targets, k)]


def substitute(template: Structure, mapping: dict[str, str], scale_volume: bool = True) -> Structure:
    """The template with elements replaced per ``mapping``, optionally rescaled (pymatgen path)."""
    new = template.copy()
    new.replace_species(mapping)
    if scale_volume:
        new.scale_lattice(scaled_volume(template, new))
    return new


@lru_cache(maxsize=256)
def _z(symbol: str) -> int:
    return Element(symbol).Z


def _canonical_rows(z: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """(Z, fractional coordinates x 1e4 as integers) per site, sorted."""
    f = np.rint(np.mod(frac, 1.0) * 1e4).astype(np.int64) % 10_000
    rows = np.column_stack([z.astype(np.int64), f])
    return rows[np.lexsort(rows.T[::-1])]


def _id_from_rows(campaign: str, matrix: np.ndarray, rows: np.ndarray) -> str:
    lat = np.rint(matrix * 1e4).astype(np.int64)
    digest = hashlib.sha256(campaign.encode() + b"\0" + lat.tobytes() + b"\0" + np.ascontiguousarray(rows).tobytes())
    return digest.hexdigest()[:ID_LENGTH]


def _id_from_arrays(campaign: str, matrix: np.ndarray, z: np.ndarray, frac: np.ndarray) -> str:
    return _id_from_rows(campaign, matrix, _canonical_rows(z, frac))


def candidate_id(campaign: str, structure: Structure) -> str:
    """Content hash of the campaign name and the canonical structure."""
    z = np.array([site.specie.Z for site in structure])
    return _id_from_arrays(campaign, structure.lattice.matrix, z, structure.frac_coords)


@dataclass
class TemplatePlan:
    """A template as arrays, with its colour symmetry; built once per template."""

    template: Template
    labels: list[str]
    site_labels: np.ndarray
    counts: np.ndarray
    frac: np.ndarray
    matrix: np.ndarray
    group: tuple[tuple[int, ...], ...]
    template_volume_sum: float  # sum of the template's elemental atomic volumes
    reduced_counts: np.ndarray  # per label, in the reduced formula
    abc: list[list[float]] = field(default_factory=list)  # fractional coords as lists
    distances: np.ndarray | None = None  # (L, L): shortest distance between sites of two labels, template scale

    @classmethod
    def build(cls, template: Template, symmetry: bool, symprec: float) -> TemplatePlan:
        s = template.structure
        labels = template.elements
        index = {el: i for i, el in enumerate(labels)}
        site_labels = np.array([index[site.specie.symbol] for site in s], dtype=np.int64)
        counts = np.bincount(site_labels, minlength=len(labels))
        frac = np.mod(s.frac_coords, 1.0)
        matrix = np.array(s.lattice.matrix)
        group = colour_symmetry(matrix, frac, site_labels, symprec) if symmetry else (tuple(range(len(labels))),)
        gcd = math.gcd(*counts.tolist())
        return cls(template, labels, site_labels, counts, frac, matrix, group,
                   float(sum(atomic_volume(el) * c for el, c in zip(labels, counts, strict=True))), counts // gcd,
                   frac.tolist(), site_distances(s, labels, site_labels.tolist()))

    def bond_ratio(self, tau: Sequence[str]) -> float:
        """Shortest bond over the sum of covalent radii of decoration ``tau``, at the template's own scale (times the
        cell's linear factor at any other)."""
        r = np.array([covalent_radius(t) for t in tau])
        return float(np.min(self.distances / (r[:, None] + r[None, :])))

    def sites(self, symbols: Sequence[str]) -> list[dict[str, Any]]:
        """Site dicts of ``Structure.as_dict(verbosity=0)`` (independent of the lattice scale)."""
        return [{"species": [{"element": el, "occu": 1}], "abc": f, "properties": {}}
                for el, f in zip(symbols, self.abc, strict=True)]

    def structure_dict(self, sites: list[dict[str, Any]], factor: float) -> dict[str, Any]:
        """``Structure.as_dict(verbosity=0)`` with lattice vectors times ``factor``."""
        return {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0.0,
                "lattice": {"matrix": (self.matrix * factor).tolist(), "pbc": [True, True, True]},
                "properties": {}, "sites": sites}


def template_rejection(template: Template, n_targets: int, gen: GenerateConfig, max_sites: int) -> str | None:
    """Why a template cannot be used, or None."""
    s = template.structure
    if not s.is_ordered:
        return "disordered (partial occupancy)"
    elements = template.elements
    if len(elements) < 2:
        return "fewer than 2 elements (elemental structure)"
    if len(elements) > n_targets:
        return f"more elements than targets ({len(elements)} > {n_targets})"
    if not gen.include_subsystems and len(elements) != n_targets:
        return f"subsystem template, include_subsystems is off ({len(elements)} elements)"
    if len(s) > max_sites:
        return f"too many sites ({len(s)} > max_sites {max_sites})"
    excluded = sorted(set(elements) & set(gen.exclude_elements))
    if excluded:
        return f"excluded elements ({', '.join(excluded)})"
    natoms = int(s.composition.reduced_composition.num_atoms)
    if natoms > gen.max_formula_atoms:
        return f"formula too large ({natoms} atoms > max_formula_atoms {gen.max_formula_atoms})"
    return None


def reason_category(reason: str) -> str:
    """The part of a skip reason before its details: 'too many sites (14 > 8)' -> 'too many sites'."""
    return reason.split(" (")[0]


@lru_cache(maxsize=4096)
def charge_balanced(formula_key: tuple[tuple[str, int], ...]) -> bool:
    """Whether pymatgen finds a charge-balanced oxidation-state assignment."""
    from pymatgen.core import Composition

    return bool(Composition(dict(formula_key)).oxi_state_guesses(max_sites=-50))


def _formula(labels_targets: Sequence[str], reduced_counts: np.ndarray) -> tuple[str, tuple[tuple[str, int], ...]]:
    key = tuple(sorted(zip(labels_targets, reduced_counts.tolist(), strict=True)))
    return _reduced_formula(key), key


@lru_cache(maxsize=65536)
def _reduced_formula(key: tuple[tuple[str, int], ...]) -> str:
    from pymatgen.core import Composition

    return Composition(dict(key)).reduced_formula


@dataclass
class PlanStats:
    """Counts for one or many templates."""

    assignments: int = 0  # before symmetry reduction
    distinct: int = 0  # after symmetry reduction
    filtered: Counter = field(default_factory=Counter)  # reason -> assignments removed
    candidates: int = 0  # documents (distinct x lattice scales, after filters)
    random_starts: int = 0  # of them, a random search's structures

    def merge(self, other: PlanStats) -> None:
        self.assignments += other.assignments
        self.distinct += other.distinct
        self.filtered.update(other.filtered)
        self.candidates += other.candidates
        self.random_starts += other.random_starts


def _label_rows(plan: TemplatePlan) -> list[np.ndarray]:
    """Per template label: its sites' fractional coordinates x 1e4 as sorted integer rows."""
    f = np.rint(plan.frac * 1e4).astype(np.int64) % 10_000
    out = []
    for label in range(len(plan.labels)):
        rows = f[plan.site_labels == label]
        out.append(rows[np.lexsort(rows.T[::-1])])
    return out


def candidates_for_plan(plan: TemplatePlan, cfg: CampaignConfig, stats: PlanStats | None, build: bool = True,
                        start: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Candidate documents (plain dicts of the CandidateDoc schema) of one template.

    Documents are numbered over (distinct assignment, lattice scale); only those with
    index in [start, start + limit) are built. ``stats`` (if given) counts the whole template.
    """
    gen = cfg.generate
    kept, total = distinct_assignments(len(plan.labels), cfg.elements, plan.group, gen.include_subsystems)
    jobs = []  # (decoration, formula, linear factor of the volume rule and the floor, its bond ratio at 1, scales)
    filtered = Counter()
    floor = gen.min_bond_ratio
    for tau in kept:
        formula, key = _formula(tau, plan.reduced_counts)
        if gen.charge_balance and not charge_balanced(key):
            filtered["not charge balanced"] += 1
            continue
        if gen.scale_volume:
            new_sum = float(sum(atomic_volume(t) * c for t, c in zip(tau, plan.counts, strict=True)))
            base = (new_sum / plan.template_volume_sum) ** (1.0 / 3.0)
        else:
            base = 1.0
        ratio = plan.bond_ratio(tau)  # at the template's scale
        if floor > 0 and base * ratio < floor:  # the volume rule leaves atoms overlapping: scale up to the floor
            needed = floor / ratio
            if (needed / base) ** 3 > gen.max_void_ratio:
                filtered[f"bond floor needs more than {gen.max_void_ratio:g}x the volume rule's volume"] += 1
                continue
            base = needed * (1 + 1e-9)  # at the floor, not a rounding below it
        scales = [sc for sc in gen.lattice_scales if floor <= 0 or base * sc * ratio >= floor]
        if len(scales) < len(gen.lattice_scales):
            filtered["lattice scale below the bond floor"] += len(gen.lattice_scales) - len(scales)
        jobs.extend((tau, formula, base, ratio, sc) for sc in scales)
    if stats is not None:
        stats.assignments += total
        stats.distinct += len(kept)
        stats.filtered.update(filtered)
        stats.candidates += len(jobs)
    if not build:
        return
    stop = len(jobs) if limit is None else min(start + limit, len(jobs))
    if start >= stop:
        return
    tmpl = plan.template
    template_ref = {"source": tmpl.source, "template_id": tmpl.template_id, "formula": tmpl.structure.composition.reduced_formula}
    label_rows = _label_rows(plan)
    now = datetime.now(UTC)
    last: tuple[str, ...] | None = None
    for tau, formula, base, ratio, scale in jobs[start:stop]:
        if tau is not last:  # per decoration: its rows, sites and substitution (shared by its lattice scales)
            symbols = [tau[i] for i in plan.site_labels]
            zs = [_z(t) for t in tau]
            rows = np.concatenate([np.column_stack([np.full(len(label_rows[lab]), zs[lab]), label_rows[lab]])
                                   for lab in sorted(range(len(tau)), key=zs.__getitem__)])
            elements = sorted(set(tau))
            substitution = dict(zip(plan.labels, tau, strict=True))
            sites = plan.sites(symbols)  # never mutated
            last = tau
        factor = base * scale
        yield {
            "candidate_id": _id_from_rows(cfg.name, plan.matrix * factor, rows),
            "campaign": cfg.name, "formula": formula, "chemsys": "-".join(elements), "elements": elements,
            "nsites": len(symbols), "structure": plan.structure_dict(sites, factor),
            "template": template_ref, "substitution": substitution, "lattice_scale": scale,
            "min_bond_ratio": round(factor * ratio, 4),
            "state": "generated", "prediction": None, "dedup": None, "task_id": None, "thermo": None,
            "error": None, "fw_ids": {}, "created_at": now, "updated_at": now,
        }


@dataclass
class GenerateReport:
    """What a generation pass read, skipped and made."""

    templates: TemplateLog = field(default_factory=TemplateLog)
    stats: PlanStats = field(default_factory=PlanStats)

    @property
    def candidates(self) -> int:
        return self.stats.candidates

    def as_dict(self) -> dict[str, Any]:
        reasons = Counter(reason_category(reason) for _, reason in self.templates.skipped)
        return {
            "templates_read": self.templates.read,
            "templates_skipped": len(self.templates.skipped),
            "skip_reasons": dict(reasons),
            "assignments": self.stats.assignments,
            "after_symmetry": self.stats.distinct,
            "filtered": dict(self.stats.filtered),
            "candidates": self.stats.candidates,
            "random_starts": self.stats.random_starts,
        }


CHUNK = 2000  # most documents one worker task returns (bounds memory per task)


def process_item(item: TemplateItem, cfg: CampaignConfig, build: bool = True, start: int = 0,
                 limit: int | None = None) -> tuple[list[dict[str, Any]], TemplateLog, PlanStats, int | None]:
    """One template item -> documents [start, start + limit), log, counts, next start.

    The log and counts describe the whole item and come with ``start == 0`` only; a
    template with more documents than ``limit`` is continued by another task.
    """
    limit = limit or CHUNK
    first = start == 0
    log = TemplateLog()
    stats = PlanStats()
    docs: list[dict[str, Any]] = []
    if item.kind == "random":  # a random search's structures: made whole, no decoration (one task per chunk)
        from amdflow.generate.random_search import random_documents

        made, skipped = random_documents(item, cfg)
        n = item.payload[2] - item.payload[1]  # (random starts are no templates: `generate` prints the search's own line)
        stats.assignments += n
        stats.distinct += n
        stats.filtered.update({f"random: {why}": k for why, k in skipped.items()})
        stats.candidates += len(made)
        stats.random_starts += len(made)
        return (made if build else []), log, stats, None
    templates, skipped = load_item(item)
    if first:
        log.skipped.extend(skipped)
    offset = 0  # document index where the current template starts, over the item
    for tmpl in templates:
        reason = template_rejection(tmpl, len(cfg.elements), cfg.generate, item.max_sites)
        if reason:
            if first:
                log.skipped.append((f"{tmpl.source}:{tmpl.template_id}", reason))
            continue
        if first:
            log.read += 1
        plan = TemplatePlan.build(tmpl, cfg.generate.symmetry_reduce, cfg.generate.symprec)
        counts = PlanStats()
        list(candidates_for_plan(plan, cfg, counts, build=False))
        if first:
            stats.merge(counts)
        n = counts.candidates
        if build and start < offset + n and len(docs) < limit:
            local = max(start - offset, 0)
            docs.extend(candidates_for_plan(plan, cfg, None, True, local, limit - len(docs)))
        offset += n
    end = start + len(docs)
    return docs, log, stats, (end if build and end < offset else None)


def _process_item_bson(item: TemplateItem, cfg: CampaignConfig, build: bool, start: int) -> tuple[bytes, TemplateLog, PlanStats, int | None]:
    """``process_item`` for a worker process: the documents travel as one BSON blob.

    Pickling nested dicts between processes costs about as much as building them;
    BSON encoding and decoding run in C (measured: 2 workers went from slower than one
    process to faster, BENCHMARKS.md).
    """
    import bson

    docs, log, stats, next_start = process_item(item, cfg, build, start)
    return bson.encode({"d": docs}), log, stats, next_start


PARALLEL_MIN_DOCS = 20_000  # below this (estimated) a process pool costs more than it saves


def default_workers(items: Sequence[TemplateItem], cfg: CampaignConfig | None = None) -> int:
    """AMDFLOW_GENERATE_WORKERS, else a pool (CPU count, at most 8) for big or file-based jobs.

    Measured here (BENCHMARKS.md): for a folder of CIFs parsing dominates and 2 workers
    run 1.7x faster; for in-memory templates 2 workers gain 1.3-1.4x on jobs of 30,000+
    documents but lose on small ones, where starting the pool costs more than the work.
    The job size is estimated as templates x ordered target triples x lattice scales.
    """
    from amdflow.settings import get_settings

    configured = get_settings().generate_workers
    if configured:
        return configured
    pool = min(os.cpu_count() or 1, 8)
    if any(item.kind in ("file", "random") for item in items):  # parsing files, pyxtal: both CPU-bound per item
        return pool
    if cfg is not None:
        n = len(cfg.elements)
        estimate = len(items) * math.perm(n, min(n, 3)) * len(cfg.generate.lattice_scales)
        if estimate >= PARALLEL_MIN_DOCS:
            return pool
    return 1


def generate_candidates(cfg: CampaignConfig, report: GenerateReport | None = None, workers: int | None = None,
                        build: bool = True, progress: Any = None, raw: bool = False) -> Iterator[Any]:
    """Stream candidate documents of a campaign; fills ``report`` as it goes.

    ``raw=True`` yields ``bson.raw_bson.RawBSONDocument``s: what pymongo inserts without
    re-encoding, with fields decoded lazily on access. Decoding whole documents costs
    ~40 us each (more than building one), so a database consumer should ask for raw.

    With more than one worker, template items are processed in a process pool, at most
    ``WINDOW_PER_WORKER`` tasks per worker in flight and at most ``CHUNK`` documents per
    task, so memory stays bounded however large a template's output is. Output order is
    the same as in one process: the stream is deterministic.
    """
    import bson
    from bson.raw_bson import RawBSONDocument

    report = report if report is not None else GenerateReport()
    items = template_items(cfg)
    workers = workers or default_workers(items, cfg)
    done_items = 0
    if progress:
        progress(0, len(items), "reading templates")

    def account(result: tuple[Any, TemplateLog, PlanStats, int | None], start: int) -> list[dict[str, Any]]:
        nonlocal done_items
        docs, log, stats, next_start = result
        if isinstance(docs, bytes):
            options = _raw_codec() if raw else _codec()
            docs = bson.decode(docs, codec_options=options)["d"]
        elif raw:
            raw_options = _raw_codec()
            docs = [RawBSONDocument(bson.encode(d), codec_options=raw_options) for d in docs]
        if start == 0:
            report.templates.merge(log)
            report.stats.merge(stats)
        if next_start is None:
            done_items += 1
            if progress:
                progress(done_items, len(items), "reading templates")
        return docs

    if workers <= 1 or len(items) < 2 * workers:
        for item in items:
            start: int | None = 0
            while start is not None:
                result = process_item(item, cfg, build, start)
                yield from account(result, start)
                start = result[3]
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    submit_item = _process_item_bson
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        order: list[tuple[int, int]] = []  # task keys (item index, start) in output order
        futures: dict[tuple[int, int], Any] = {}
        next_item = 0
        window = workers * WINDOW_PER_WORKER
        while order or next_item < len(items):
            while next_item < len(items) and len(futures) < window:
                key = (next_item, 0)
                futures[key] = pool.submit(submit_item, items[next_item], cfg, build, 0)
                order.append(key)
                next_item += 1
            key = order[0]
            result = futures[key].result()
            del futures[key]
            order.pop(0)
            if result[3] is not None:  # continue this template before the next item
                cont = (key[0], result[3])
                futures[cont] = pool.submit(submit_item, items[key[0]], cfg, build, result[3])
                order.insert(0, cont)
            yield from account(result, key[1])
