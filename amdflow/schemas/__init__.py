"""Documents of amdflow's own collections, beside the LaunchPad's.

Collections (in the LaunchPad's database): ``campaigns``, ``candidates``, ``tasks``,
``references``, ``thermo``. Energies are eV, per-atom values eV/atom.
"""

from __future__ import annotations

from amdflow.schemas.docs import (
    COLLECTIONS,
    CampaignDoc,
    CandidateDoc,
    CandidateState,
    DedupRecord,
    FunnelRecord,
    Prediction,
    ReferenceDoc,
    TaskDoc,
    TemplateRef,
    ThermoDoc,
    utcnow,
)

__all__ = [
    "COLLECTIONS",
    "CampaignDoc",
    "CandidateDoc",
    "CandidateState",
    "DedupRecord",
    "FunnelRecord",
    "Prediction",
    "ReferenceDoc",
    "TaskDoc",
    "TemplateRef",
    "ThermoDoc",
    "utcnow",
]
