"""Workflow factories: one workflow per candidate, one per element's references.

Candidate workflow: predict (``_category`` gpu) -> dedup (cpu) -> [funnel (gpu)] ->
relax (vasp) -> analyze (cpu); the funnel Firework is there when the campaign's funnel
is on. Only ids travel in specs. Priorities: predict runs before everything (so each
structure family is fully predicted before its dedup), references before candidate
relaxations, then candidates by predicted energy, lowest first; with the funnel, relax
Fireworks by their ML energy above the hull, lowest first.

Relaxation levels: ``final`` (the campaign's relax engine: DFT, or its laptop stand-in)
and ``funnel`` (the funnel's universal potential). Reference and known-phase workflows
exist per level, so each hull has references computed the same way as its entries.
"""

from __future__ import annotations

from fireworks import Firework, Workflow

from amdflow.firetasks import (
    AnalyzeTask,
    DedupTask,
    FunnelTask,
    PredictTask,
    RelaxKnownTask,
    RelaxReferenceTask,
    RelaxTask,
)

PREDICT_PRIORITY = 10_000.0
REFERENCE_PRIORITY = 1_000.0
STAGES = ("predict", "dedup", "funnel", "relax", "analyze")
CATEGORIES = {"predict": "gpu", "dedup": "cpu", "funnel": "gpu", "relax": "vasp", "analyze": "cpu", "reference": "vasp", "known": "vasp"}
LEVELS = ("final", "funnel")


def _spec(stage: str, campaign: str, priority: float, level: str = "final", **extra: object) -> dict[str, object]:
    # the funnel's potential runs where models run (gpu), at every stage; analyze stays on cpu
    category = "gpu" if level == "funnel" and stage != "analyze" else CATEGORIES[stage]
    spec = {"_category": category, "_priority": priority, "_add_launchpad_and_fw_id": True,
            "campaign": campaign, "amdflow_stage": stage, **extra}
    if level != "final":
        spec["amdflow_level"] = level
    return spec


def candidate_workflow(candidate_id: str, campaign: str, formula: str, funnel: bool = False) -> Workflow:
    """The chain of one candidate: predict, dedup, [funnel], relax, analyze."""
    tag = f"{formula} {candidate_id[:10]}"
    fws = [
        Firework(PredictTask(candidate_id=candidate_id), spec=_spec("predict", campaign, PREDICT_PRIORITY, candidate_id=candidate_id), name=f"predict {tag}"),
        Firework(DedupTask(candidate_id=candidate_id), spec=_spec("dedup", campaign, 0.0, candidate_id=candidate_id), name=f"dedup {tag}"),
    ]
    if funnel:
        fws.append(Firework(FunnelTask(candidate_id=candidate_id), spec=_spec("funnel", campaign, 0.0, candidate_id=candidate_id),
                            name=f"funnel {tag}"))
    fws += [
        Firework(RelaxTask(candidate_id=candidate_id), spec=_spec("relax", campaign, 0.0, candidate_id=candidate_id), name=f"relax {tag}"),
        Firework(AnalyzeTask(campaign=campaign, candidate_id=candidate_id), spec=_spec("analyze", campaign, 0.0, candidate_id=candidate_id), name=f"analyze {tag}"),
    ]
    links = {fws[i]: [fws[i + 1]] for i in range(len(fws) - 1)}
    return Workflow(fws, links, name=f"{campaign} {tag}",
                    metadata={"campaign": campaign, "candidate_id": candidate_id, "formula": formula, "amdflow": "candidate"})


def _level_params(level: str) -> dict[str, str]:
    return {} if level == "final" else {"level": level}


def reference_workflow(campaign: str, element: str, prototypes: list[str], level: str = "final") -> Workflow:
    """Relax each elemental prototype at ``level``, then rebuild that level's hull."""
    relax = [
        Firework(RelaxReferenceTask(campaign=campaign, element=element, prototype=p, **_level_params(level)),
                 spec=_spec("reference", campaign, REFERENCE_PRIORITY, level, element=element), name=f"reference {element} {p}"
                 + ("" if level == "final" else f" ({level})"))
        for p in prototypes
    ]
    analyze = Firework(AnalyzeTask(campaign=campaign, **_level_params(level)), spec=_spec("analyze", campaign, REFERENCE_PRIORITY, level),
                       name=f"analyze references {element}" + ("" if level == "final" else f" ({level})"))
    return Workflow([*relax, analyze], {fw: [analyze] for fw in relax}, name=f"{campaign} references {element}"
                    + ("" if level == "final" else f" ({level})"),
                    metadata={"campaign": campaign, "element": element, "amdflow": "reference", "level": level})


def known_workflow(campaign: str, known: list[tuple[str, str]], level: str = "final") -> Workflow:
    """Relax imported known phases ((known_id, formula) pairs) the campaign's way at ``level``, then rebuild that hull.

    The analyze step runs even if some relaxations fizzle: one bad known phase blocks nothing.
    """
    relax = [
        Firework(RelaxKnownTask(campaign=campaign, known_id=known_id, **_level_params(level)),
                 spec=_spec("known", campaign, REFERENCE_PRIORITY, level, known_id=known_id), name=f"known {formula} {known_id}")
        for known_id, formula in known
    ]
    analyze = Firework(AnalyzeTask(campaign=campaign, **_level_params(level)),
                       spec=_spec("analyze", campaign, REFERENCE_PRIORITY, level, _allow_fizzled_parents=True),
                       name="analyze known phases" + ("" if level == "final" else f" ({level})"))
    return Workflow([*relax, analyze], {fw: [analyze] for fw in relax}, name=f"{campaign} known phases"
                    + ("" if level == "final" else f" ({level})"), metadata={"campaign": campaign, "amdflow": "known", "level": level})
