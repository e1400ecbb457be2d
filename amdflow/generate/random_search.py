"""Random structure search (AIRSS-style) as a template source: ``templates: - source: random``.

Substitution finds only structure types someone has catalogued. A random search needs none:
for each composition, ``n_structures`` random symmetric crystals are built by pyxtal
(Fredericks et al., Comput. Phys. Commun. 2021), each with a space group drawn uniformly
from those whose Wyckoff positions can hold the composition at 1..``max_z`` formula units,
as pyxtal's own random searches draw them. Relaxed by the funnel's potential in batches,
the lowest structures of a composition are the search's answer; AIRSS (Pickard & Needs
2011) calls a composition searched enough when its lowest structure has been found several
times, which :mod:`amdflow.stages.random_search` counts.

Geometry follows the substitution path: pyxtal places atoms no closer than
``generate.min_bond_ratio`` x their summed covalent radii (its distance check, a
``Tol_matrix`` of those pairs), the cell is rescaled to the volume rule's volume (the summed
elemental atomic volumes) and, where that puts atoms below the floor, scaled up to it (or
skipped past ``generate.max_void_ratio``).

Determinism: structure ``i`` of a composition is drawn from a seed hashed from the source's
``seed``, the composition and ``i`` only, so the same settings give the same candidates
(content-hash ids, idempotent ``add``), and a higher ``n_structures`` adds only the new
indices.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Composition, Lattice, Structure

from amdflow.campaign import CampaignConfig, RandomTemplates
from amdflow.errors import ConfigError
from amdflow.generate.templates import TemplateItem
from amdflow.generate.volume import atomic_volume, covalent_radius, min_bond_ratio

#: Random structures per worker task (each takes milliseconds to a second in pyxtal).
CHUNK = 16
#: Space-group draws tried per structure before it is given up (pyxtal fails on crowded Wyckoff choices).
ATTEMPTS = 8
#: pyxtal's distance tolerances when the campaign's floor is off (generate.min_bond_ratio: 0).
DEFAULT_TOLERANCE_RATIO = 0.75


def _reduced(counts: tuple[int, ...]) -> bool:
    return math.gcd(*counts) == 1


def check_placeable(elements: list[str]) -> None:
    """Raise :class:`ConfigError` naming the elements pyxtal cannot place: it sizes its cells from each element's
    covalent and van der Waals radii, and has neither for some heavy elements (Rf, No, ...)."""
    from pyxtal.database.element import Element as PyxtalElement

    bad = []
    for el in elements:
        try:
            e = PyxtalElement(el)
            ok = e.covalent_radius is not None and e.vdw_radius is not None
        except Exception:  # pyxtal raises on symbols outside its table
            ok = False
        if not ok:
            bad.append(el)
    if bad:
        raise ConfigError(f"templates (random): pyxtal has no covalent or van der Waals radius for {', '.join(bad)}, so "
                          "it cannot place them: remove the random source or those elements")


def random_compositions(elements: list[str], source: RandomTemplates, include_subsystems: bool) -> list[str]:
    """The source's compositions as reduced formulas: its explicit list, or every reduced formula of two or more of
    ``elements`` (binaries too when ``include_subsystems``) whose formula unit fits ``max_atoms``. Raises
    :class:`ConfigError` when a listed composition uses another element or cannot fit, or when there are more than
    ``max_compositions``."""
    if source.compositions:
        out = []
        check_placeable(sorted({el.symbol for text in source.compositions for el in _formula(text).elements}
                               & set(elements)))
        for text in source.compositions:
            comp = _formula(text)
            if len(comp.elements) < 2:
                raise ConfigError(f"templates (random): composition '{text}' has one element: elements are the hull's "
                                  "references (relax.reference_*), list compositions of two or more")
            extra = sorted({el.symbol for el in comp.elements} - set(elements))
            if extra:
                raise ConfigError(f"templates (random): composition '{text}' uses {', '.join(extra)}, not among the "
                                  f"campaign's elements {elements}: remove it or add the element")
            n = int(comp.reduced_composition.num_atoms)
            if n > source.max_atoms:
                raise ConfigError(f"templates (random): composition '{text}' has {n} atoms per formula unit, more than "
                                  f"max_atoms {source.max_atoms}: raise max_atoms or remove it")
            out.append(comp.reduced_formula)
        return list(dict.fromkeys(out))
    check_placeable(elements)
    smallest = 2 if include_subsystems else len(elements)
    found: dict[str, None] = {}
    for k in range(max(smallest, 2), len(elements) + 1):
        for subset in itertools.combinations(sorted(elements), k):
            for counts in itertools.product(range(1, source.max_atoms + 1), repeat=k):
                if sum(counts) <= source.max_atoms and _reduced(counts):
                    found[Composition(dict(zip(subset, counts, strict=True))).reduced_formula] = None
    if not found:
        raise ConfigError(f"templates (random): max_atoms {source.max_atoms} is too small for any composition of "
                          f"{len(elements) if not include_subsystems else 2} elements: raise it")
    if len(found) > source.max_compositions:
        raise ConfigError(f"templates (random): {len(found)} compositions of {'-'.join(elements)} fit max_atoms "
                          f"{source.max_atoms}, more than max_compositions {source.max_compositions}: lower max_atoms, "
                          "list compositions, or raise max_compositions")
    return sorted(found, key=lambda f: (len(Composition(f)), Composition(f).num_atoms, f))


def _formula(text: str) -> Composition:
    try:
        comp = Composition(text)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"templates (random): composition '{text}' is not a formula ({err}): write e.g. 'CeFe2'") from None
    if comp.num_atoms == 0 or any(abs(n - round(n)) > 1e-8 for n in comp.values()):
        raise ConfigError(f"templates (random): composition '{text}' needs whole numbers of atoms: write e.g. 'CeFe2'")
    return comp


def random_items(source: RandomTemplates, cfg: CampaignConfig) -> list[TemplateItem]:
    """One worker task per (composition, chunk of structure indices)."""
    out = []
    for formula in random_compositions(cfg.elements, source, cfg.generate.include_subsystems):
        for start in range(0, source.n_structures, CHUNK):
            stop = min(start + CHUNK, source.n_structures)
            out.append(TemplateItem(kind="random", source="random", ref=formula, rel=f"{formula}[{start}:{stop}]",
                                    max_sites=source.max_atoms, payload=(source.model_dump(mode="json"), start, stop)))
    return out


def structure_seed(seed: int, formula: str, index: int) -> int:
    """The seed of structure ``index`` of ``formula``: independent of how many structures are asked for."""
    digest = hashlib.sha256(f"{seed}\0{formula}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@lru_cache(maxsize=1024)
def compatible_groups(num_ions: tuple[int, ...]) -> tuple[int, ...]:
    """Space groups whose Wyckoff positions can hold ``num_ions`` atoms of each species (pyxtal's check)."""
    return tuple(g for g in range(1, 231) if _group(g).check_compatible(list(num_ions))[0])


@lru_cache(maxsize=230)
def _group(number: int) -> Any:
    from pyxtal.symmetry import Group

    return Group(number)


@lru_cache(maxsize=256)
def _tolerances(species: tuple[str, ...], ratio: float) -> Any:
    from pyxtal.tolerance import Tol_matrix

    pairs = [(a, b, ratio * (covalent_radius(a) + covalent_radius(b)))
             for a, b in itertools.combinations_with_replacement(species, 2)]
    return Tol_matrix(*pairs, prototype="atomic")


def random_structure(formula: str, index: int, source: RandomTemplates, floor: float, max_void_ratio: float
                     ) -> tuple[Structure | None, dict[str, Any]]:
    """Structure ``index`` of ``formula``: (structure, its record) or (None, {'reason': why it was skipped})."""
    from pyxtal import pyxtal

    comp = Composition(formula)
    species = tuple(el.symbol for el in comp.elements)
    unit = [int(comp[el]) for el in species]
    seed = structure_seed(source.seed, formula, index)
    rng = np.random.default_rng(seed)
    zs = [z for z in range(1, source.max_z + 1) if z * sum(unit) <= source.max_atoms]
    if not zs:
        return None, {"reason": f"formula unit larger than max_atoms ({sum(unit)} > {source.max_atoms})"}
    groups_tried = []
    tm = _tolerances(species, floor if floor > 0 else DEFAULT_TOLERANCE_RATIO)
    for _ in range(ATTEMPTS):
        z = int(rng.choice(zs))
        num = tuple(n * z for n in unit)
        groups = [g for g in compatible_groups(num) if not source.space_groups or g in source.space_groups]
        if not groups:
            groups_tried.append(f"Z={z}: no space group")
            continue
        group = int(rng.choice(groups))
        crystal = pyxtal()
        try:
            crystal.from_random(3, group, list(species), list(num), factor=1.0, tm=tm,
                                random_state=int(rng.integers(2**31)), max_count=5)
            s = crystal.to_pymatgen()
        except Exception as err:  # pyxtal raises RuntimeError (and others) when the sites cannot be placed
            groups_tried.append(f"{group}: {type(err).__name__}")
            continue
        break
    else:
        return None, {"reason": f"pyxtal could not place {formula} in {ATTEMPTS} space-group draws"}
    # the volume rule's volume, then the bond floor (as substitution candidates get them)
    s = Structure(Lattice(s.lattice.matrix), s.species, s.frac_coords)  # plain pymatgen, no pyxtal properties
    s.scale_lattice(sum(atomic_volume(sp.symbol) for sp in s.species))
    ratio = min_bond_ratio(s)
    if floor > 0 and ratio < floor:
        factor = floor / ratio * (1 + 1e-9)
        if factor**3 > max_void_ratio:
            return None, {"reason": f"bond floor needs more than {max_void_ratio:g}x the volume rule's volume"}
        s.scale_lattice(s.volume * factor**3)
        ratio *= factor
    return s, {"composition": formula, "index": index, "seed": seed, "space_group": group, "z": z,
               "min_bond_ratio": round(ratio, 4)}


def random_documents(item: TemplateItem, cfg: CampaignConfig) -> tuple[list[dict[str, Any]], Counter]:
    """The candidate documents of one random item (a composition's structure indices [start, stop)), and the
    skip reasons of the structures that could not be made."""
    from amdflow.generate.substitute import candidate_id

    data, start, stop = item.payload
    source = RandomTemplates.model_validate(data)
    formula = item.ref
    gen = cfg.generate
    skipped: Counter = Counter()
    docs = []
    now = datetime.now(UTC)
    for index in range(start, stop):
        s, info = random_structure(formula, index, source, gen.min_bond_ratio, gen.max_void_ratio)
        if s is None:
            skipped[info["reason"].split(" (")[0]] += 1
            continue
        elements = sorted({sp.symbol for sp in s.species})
        docs.append({
            "candidate_id": candidate_id(cfg.name, s), "campaign": cfg.name, "formula": s.composition.reduced_formula,
            "chemsys": "-".join(elements), "elements": elements, "nsites": len(s),
            "structure": s.as_dict(verbosity=0),
            "template": {"source": "random", "template_id": f"{formula}#{index}", "formula": formula},
            "substitution": {el: el for el in elements}, "lattice_scale": 1.0,
            "min_bond_ratio": info["min_bond_ratio"], "random": {k: info[k] for k in ("index", "seed", "space_group", "z")},
            "state": "generated", "prediction": None, "dedup": None, "task_id": None, "thermo": None,
            "error": None, "fw_ids": {}, "created_at": now, "updated_at": now,
        })
    return docs, skipped
