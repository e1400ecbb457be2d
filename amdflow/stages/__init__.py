"""The pipeline stages on the database: what each Firetask (and the CLI) calls.

One module per stage; each function takes an :class:`~amdflow.db.AmdflowDB`, reads the
documents it needs, calls the pure science functions and writes the outcome back. No
FireWorks here: the Firetasks in :mod:`amdflow.firetasks` translate outcomes into
``FWAction``s.

* :mod:`~amdflow.stages.common`: stored campaign settings, candidate state, claims
* :mod:`~amdflow.stages.predict`: CGCNN prediction and the screen
* :mod:`~amdflow.stages.dedup`: one representative per structure family
* :mod:`~amdflow.stages.funnel`: universal-potential relaxation, its ML hull and cut
* :mod:`~amdflow.stages.relax`: candidates and elemental references, task documents
* :mod:`~amdflow.stages.known`: known phases imported and relaxed the campaign's way
* :mod:`~amdflow.stages.analyze`: hull, promising/, plots
* :mod:`~amdflow.stages.training`: a campaign's hull as CGCNN training data

Every name below was importable from the single ``amdflow.stages`` module this package
replaced, and stays importable from here.
"""

from amdflow.stages.analyze import (
    PLOT_FILE,
    PLOT_HTML,
    PROMISING_DIR,
    analyze_stage,
    campaign_thermo,
    promising_rows,
    refresh_outputs,
)
from amdflow.stages.common import (
    CLAIM_STALE_S,
    HULL_CLAIM_STALE_S,
    ClaimTimeout,
    campaign_doc,
    claim,
    funnel_run_type_of,
    load_campaign_config,
    load_candidate,
    record_failure,
    run_type_of,
    set_state,
)
from amdflow.stages.dedup import SCREENED_BY_TOP_K, DedupOutcome, dedup_many, dedup_stage
from amdflow.stages.funnel import (
    ML_FAILED_PRIORITY,
    FunnelCut,
    FunnelOutcome,
    funnel_hull_stage,
    funnel_stage,
    priority_from_e_above_hull,
    refresh_funnel_hull,
)
from amdflow.stages.known import (
    KnownReport,
    import_known_phases,
    known_reference_id,
    relax_known_stage,
)
from amdflow.stages.predict import PredictOutcome, predict_stage
from amdflow.stages.relax import (
    OverBudget,
    chosen_references,
    level_engine,
    pending_references,
    reference_id,
    reference_name,
    reference_structure,
    relax_candidate_stage,
    relax_reference_stage,
    take_budget_slot,
    task_doc,
)
from amdflow.stages.training import campaign_training_data

__all__ = [
    "CLAIM_STALE_S",
    "HULL_CLAIM_STALE_S",
    "ML_FAILED_PRIORITY",
    "PLOT_FILE",
    "PLOT_HTML",
    "PROMISING_DIR",
    "SCREENED_BY_TOP_K",
    "ClaimTimeout",
    "DedupOutcome",
    "FunnelCut",
    "FunnelOutcome",
    "KnownReport",
    "OverBudget",
    "PredictOutcome",
    "analyze_stage",
    "campaign_doc",
    "campaign_thermo",
    "campaign_training_data",
    "chosen_references",
    "claim",
    "dedup_many",
    "dedup_stage",
    "funnel_hull_stage",
    "funnel_run_type_of",
    "funnel_stage",
    "import_known_phases",
    "known_reference_id",
    "level_engine",
    "load_campaign_config",
    "load_candidate",
    "pending_references",
    "predict_stage",
    "priority_from_e_above_hull",
    "promising_rows",
    "record_failure",
    "reference_id",
    "reference_name",
    "reference_structure",
    "refresh_funnel_hull",
    "refresh_outputs",
    "relax_candidate_stage",
    "relax_known_stage",
    "relax_reference_stage",
    "run_type_of",
    "set_state",
    "take_budget_slot",
    "task_doc",
]
