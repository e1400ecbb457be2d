"""The funnel's treatment of random-search candidates (templates source: random), and the search's convergence.

* **A short first pass, then halving.** Random starts are mostly poor: each is relaxed for
  ``first_pass_steps`` FIRE steps first; those then more than ``halving_margin`` eV/atom above
  their composition's lowest so far (this batch's first passes and every relaxation already
  stored) stop there, cut with the reason, their partial relaxation kept as an unconverged
  task. The rest continue from where they stopped to the funnel's full ``max_steps``. This
  is one round of successive halving (Jamieson & Talwalkar 2016) with an energy gap instead
  of a fixed fraction: a gap keeps every start that might still win, however many do.
* **Dedup of the relaxed structures** is the funnel's second dedup, as for every candidate:
  a relaxed structure that matches a lower one of its formula is its duplicate.
* **Holes.** A start whose relaxation trips the potential's guard, or lands below the hull's
  formation-energy floor, is cut (``funnel.hole``), not passed on to DFT as other candidates
  in a hole are: it is one draw of many. The count is shown per composition.
* **Convergence, as AIRSS reads it** (Pickard & Needs 2011): a composition is searched
  enough when its lowest relaxed structure has been found ``stop_found`` times, i.e. that
  many random starts relaxed into it (the start itself and its duplicates, through chains
  of duplicates; the lowest may be a substitution candidate's structure, which the random
  starts then rediscovered). From then on the composition's unrelaxed random candidates are not
  relaxed (cut with the reason); ``n_structures`` bounds the search otherwise.

:func:`search_summary` is the pure part (documents in, per-composition figures out); the
funnel stage, ``status``, ``show`` and the report read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import CampaignConfig, RandomTemplates
from amdflow.db import AmdflowDB

#: Candidate fields the summary reads.
SUMMARY_FIELDS = {"_id": 0, "candidate_id": 1, "formula": 1, "state": 1, "funnel": 1, "random": 1, "template.source": 1}


def random_source(cfg: CampaignConfig) -> RandomTemplates | None:
    """The campaign's random-search source (a campaign has at most one), or None."""
    return next((t for t in cfg.templates if isinstance(t, RandomTemplates)), None)


def is_random(doc: dict[str, Any]) -> bool:
    return (doc.get("template") or {}).get("source") == "random"


@dataclass(frozen=True)
class SearchStat:
    """One composition's random search so far."""

    composition: str
    generated: int  # random candidates of the composition
    relaxed: int  # of them relaxed by the funnel's potential (to the end, or stopped after the first pass)
    stopped_early: int  # stopped after the first pass (above the lowest by more than the margin)
    lowest_id: str | None  # candidate id of the formula's lowest relaxed structure (a random start's or a template's)
    lowest_energy_per_atom: float | None  # its ML energy, on the funnel's run type scale
    lowest_space_group: int | None  # the space group its random start was drawn in (None: a template's)
    found_lowest: int  # random starts that relaxed into the lowest structure (itself and its duplicates)
    converged: bool  # found_lowest >= stop_found
    lowest_source: str | None = None  # 'random', or the template source that found it first
    holes: int = 0  # starts whose relaxation fell into a hole of the potential (cut, funnel.hole)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _root(cid: str, parent: dict[str, str | None]) -> str:
    seen = set()
    while parent.get(cid) and cid not in seen:
        seen.add(cid)
        cid = parent[cid]  # type: ignore[assignment]
    return cid


def search_summary(docs: Iterable[dict[str, Any]], stop_found: int) -> dict[str, SearchStat]:
    """Per composition of the random search, from the documents (:data:`SUMMARY_FIELDS`) of *every* candidate of its
    formulas (random starts and substitution candidates): how far its search has got.

    The lowest structure is the lowest ML energy among the formula's relaxed candidates that are no one's duplicate
    and ran to the end (a start stopped after the first pass has a partial energy, not a minimum's); it may be a
    substitution candidate's. It was *found* by every random start whose chain of ``funnel.duplicate_of`` ends at it
    (AIRSS counts the random starts that fell into the lowest minimum). Formulas without a random start are left out.
    """
    by_formula: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_formula.setdefault(d["formula"], []).append(d)
    out = {}
    for formula, group in sorted(by_formula.items()):
        starts = [d for d in group if is_random(d)]
        if not starts:
            continue
        relaxed = [d for d in group if (d.get("funnel") or {}).get("energy_per_atom") is not None]
        parent = {d["candidate_id"]: (d.get("funnel") or {}).get("duplicate_of") for d in relaxed}
        roots = [d for d in relaxed if not parent[d["candidate_id"]] and not d["funnel"].get("stopped_early")]
        lowest = min(roots, key=lambda d: (d["funnel"]["energy_per_atom"], d["candidate_id"]), default=None)
        mine = [d for d in relaxed if is_random(d)]
        found = 0 if lowest is None else sum(_root(d["candidate_id"], parent) == lowest["candidate_id"] for d in mine)
        out[formula] = SearchStat(
            composition=formula, generated=len(starts), relaxed=len(mine),
            stopped_early=sum(bool(d["funnel"].get("stopped_early")) for d in mine),
            lowest_id=None if lowest is None else lowest["candidate_id"],
            lowest_energy_per_atom=None if lowest is None else round(float(lowest["funnel"]["energy_per_atom"]), 6),
            lowest_space_group=None if lowest is None else (lowest.get("random") or {}).get("space_group"),
            lowest_source=None if lowest is None else (lowest.get("template") or {}).get("source"),
            found_lowest=found, converged=found >= stop_found,
            holes=sum(bool((d.get("funnel") or {}).get("hole")) for d in starts))
    return out


def campaign_search(db: AmdflowDB, cfg: CampaignConfig, formulas: list[str] | None = None) -> dict[str, SearchStat]:
    """:func:`search_summary` of the campaign's random search (of ``formulas`` only, when given)."""
    source = random_source(cfg)
    if source is None:
        return {}
    return formula_search(db, cfg.name, source.stop_found, formulas)


def formula_search(db: AmdflowDB, campaign: str, stop_found: int, formulas: list[str] | None = None) -> dict[str, SearchStat]:
    """:func:`search_summary` over the campaign's candidates of the random search's formulas (or of ``formulas``)."""
    if formulas is None:
        formulas = db.candidates.distinct("formula", {"campaign": campaign, "template.source": "random"})
    query = {"campaign": campaign, "formula": {"$in": sorted(set(formulas))}}
    return search_summary(db.candidates.find(query, SUMMARY_FIELDS), stop_found)


def converged_reason(stat: SearchStat, stop_found: int) -> str:
    return (f"random search of {stat.composition} converged: its lowest structure was found {stat.found_lowest} times "
            f"(stop_found {stop_found}); not relaxed")


def stopped_reason(energy: float, lowest: float, formula: str, steps: int, margin: float) -> str:
    return (f"random search: {energy - lowest:.3f} eV/atom above {formula}'s lowest so far after the first pass "
            f"({steps} steps) > halving_margin {margin}")


def two_pass_relax(structures: list[Structure], formulas: list[str], first: Any, rest: Any,
                   energy: Callable[[int, Any], float], lowest: dict[str, float], margin: float, workers: int = 1
                   ) -> list[Any]:
    """Relax random starts in two passes: ``first`` (an engine with the short step limit) for all, then ``rest`` (the
    remaining steps) from where it stopped for those within ``margin`` eV/atom of their composition's lowest so far
    (``lowest``, updated with this batch's first passes; ``energy(i, result)`` puts a result on its scale). A start
    stopped after the first pass gets its first-pass result with ``details['stopped_early']`` (the reason); one
    finished within it, or whose first pass failed, its first-pass result. Returns the results in order."""
    from amdflow.relax import relax_many
    from amdflow.relax.base import RelaxResult

    out: list[Any] = list(relax_many(first, structures, workers))
    lowest = dict(lowest)
    energies: dict[int, float] = {}
    for i, r in enumerate(out):
        if isinstance(r, RelaxResult):
            try:
                energies[i] = energy(i, r)
            except Exception as err:  # a correction that cannot be made: the start's own failure
                out[i] = err
                continue
            lowest[formulas[i]] = min(lowest.get(formulas[i], energies[i]), energies[i])
    go_on = []
    for i, r in enumerate(out):
        if not isinstance(r, RelaxResult) or r.converged or r.n_steps < first.cfg.max_steps:
            continue  # failed, or done within the first pass
        gap = energies[i] - lowest[formulas[i]]
        if gap > margin:
            r.details["stopped_early"] = stopped_reason(energies[i], lowest[formulas[i]], formulas[i], r.n_steps, margin)
        else:
            go_on.append(i)
    if go_on:
        for i, r2 in zip(go_on, relax_many(rest, [out[i].final_structure for i in go_on], workers), strict=True):
            r1 = out[i]
            if isinstance(r2, RelaxResult):
                r2 = RelaxResult(r2.final_structure, r2.energy, r2.converged, r1.n_steps + r2.n_steps, r2.max_force,
                                 r1.run_time_s + r2.run_time_s, {**r2.details, "first_pass_steps": r1.n_steps})
            out[i] = r2
    return out
