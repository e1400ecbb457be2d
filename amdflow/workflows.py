"""Workflow factories: one workflow per candidate, one per element's references.

Candidate workflow: predict (``_category`` gpu) -> dedup (cpu) -> relax (vasp) ->
analyze (cpu). Only ids travel in specs. Priorities: predict runs before everything
(so each structure family is fully predicted before its dedup), references before
candidate relaxations, then candidates by predicted energy, lowest first.
"""

from __future__ import annotations

from fireworks import Firework, Workflow

from amdflow.firetasks import (
    AnalyzeTask,
    DedupTask,
    PredictTask,
    RelaxKnownTask,
    RelaxReferenceTask,
    RelaxTask,
)

PREDICT_PRIORITY = 10_000.0
REFERENCE_PRIORITY = 1_000.0
STAGES = ("predict", "dedup", "relax", "analyze")
CATEGORIES = {"predict": "gpu", "dedup": "cpu", "relax": "vasp", "analyze": "cpu", "reference": "vasp", "known": "vasp"}


def _spec(stage: str, campaign: str, priority: float, **extra: object) -> dict[str, object]:
    return {"_category": CATEGORIES[stage], "_priority": priority, "_add_launchpad_and_fw_id": True,
            "campaign": campaign, "amdflow_stage": stage, **extra}


def candidate_workflow(candidate_id: str, campaign: str, formula: str) -> Workflow:
    """The four-Firework chain of one candidate."""
    tag = f"{formula} {candidate_id[:10]}"
    fws = [
        Firework(PredictTask(candidate_id=candidate_id), spec=_spec("predict", campaign, PREDICT_PRIORITY, candidate_id=candidate_id), name=f"predict {tag}"),
        Firework(DedupTask(candidate_id=candidate_id), spec=_spec("dedup", campaign, 0.0, candidate_id=candidate_id), name=f"dedup {tag}"),
        Firework(RelaxTask(candidate_id=candidate_id), spec=_spec("relax", campaign, 0.0, candidate_id=candidate_id), name=f"relax {tag}"),
        Firework(AnalyzeTask(campaign=campaign, candidate_id=candidate_id), spec=_spec("analyze", campaign, 0.0, candidate_id=candidate_id), name=f"analyze {tag}"),
    ]
    links = {fws[i]: [fws[i + 1]] for i in range(3)}
    return Workflow(fws, links, name=f"{campaign} {tag}",
                    metadata={"campaign": campaign, "candidate_id": candidate_id, "formula": formula, "amdflow": "candidate"})


def reference_workflow(campaign: str, element: str, prototypes: list[str]) -> Workflow:
    """Relax each elemental prototype, then rebuild the campaign's hull."""
    relax = [
        Firework(RelaxReferenceTask(campaign=campaign, element=element, prototype=p),
                 spec=_spec("reference", campaign, REFERENCE_PRIORITY, element=element), name=f"reference {element} {p}")
        for p in prototypes
    ]
    analyze = Firework(AnalyzeTask(campaign=campaign), spec=_spec("analyze", campaign, REFERENCE_PRIORITY), name=f"analyze references {element}")
    return Workflow([*relax, analyze], {fw: [analyze] for fw in relax}, name=f"{campaign} references {element}",
                    metadata={"campaign": campaign, "element": element, "amdflow": "reference"})


def known_workflow(campaign: str, known: list[tuple[str, str]]) -> Workflow:
    """Relax imported known phases ((known_id, formula) pairs) the campaign's way, then rebuild its hull.

    The analyze step runs even if some relaxations fizzle: one bad known phase blocks nothing.
    """
    relax = [
        Firework(RelaxKnownTask(campaign=campaign, known_id=known_id),
                 spec=_spec("known", campaign, REFERENCE_PRIORITY, known_id=known_id), name=f"known {formula} {known_id}")
        for known_id, formula in known
    ]
    analyze = Firework(AnalyzeTask(campaign=campaign), spec=_spec("analyze", campaign, REFERENCE_PRIORITY, _allow_fizzled_parents=True),
                       name="analyze known phases")
    return Workflow([*relax, analyze], {fw: [analyze] for fw in relax}, name=f"{campaign} known phases",
                    metadata={"campaign": campaign, "amdflow": "known"})
