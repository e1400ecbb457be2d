"""Task documents: one relaxation's record, its energy on the run type's scale (every stage that relaxes writes one).

Its own module so that the stages that relax (reference, candidate, funnel, known phases) share it
without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from amdflow.campaign import CampaignConfig
from amdflow.schemas import TaskDoc


def task_doc(kind: str, task_id: str, structure: Structure, result: Any, engine: Any, cfg: CampaignConfig,
              directory: Path | None, candidate_id: str | None = None, campaign: str | None = None,
              settings: dict[str, Any] | None = None, **extra: Any) -> TaskDoc:
    """The task document of one relaxation; ``settings`` default to the campaign's relax settings.

    ``energy`` and ``energy_per_atom`` are on the run type's scale: the engine's correction scheme applied
    (:mod:`amdflow.thermo.corrections`); ``uncorrected_energy`` is what the engine computed. Raises
    :class:`~amdflow.thermo.corrections.CorrectionError` when the correction cannot be made.
    """
    from amdflow.relax.base import corrected_energy

    comp = result.final_structure.composition
    corr = corrected_energy(engine, result)
    return TaskDoc(
        task_id=task_id, kind=kind, candidate_id=candidate_id, campaign=campaign,
        formula=comp.reduced_formula, chemsys=comp.chemical_system,
        elements=sorted(el.symbol for el in comp.elements), nsites=len(result.final_structure),
        run_type=engine.run_type, engine=engine.name, engine_note=engine.note,
        input_structure=structure.as_dict(), final_structure=result.final_structure.as_dict(),
        energy=corr.energy, energy_per_atom=corr.energy / len(result.final_structure), uncorrected_energy=corr.uncorrected_energy,
        correction=corr.correction, correction_scheme=corr.scheme.value, energy_adjustments=corr.adjustments,
        converged=result.converged,
        n_steps=result.n_steps, max_force=result.max_force, run_time_s=result.run_time_s,
        settings=settings if settings is not None else cfg.relax.model_dump(mode="json"), details=result.details,
        dir_name=str(directory) if directory else result.details.get("dir_name"),
        labels=(getattr(result, "labels", None) or None) if extra.get("level", "final") == "final" else None, **extra,
    )
