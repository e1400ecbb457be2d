"""Pydantic models of the documents amdflow stores, and the indexes its queries use."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    """Timezone-aware now (UTC), the timestamp of every document."""
    return datetime.now(UTC)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    def to_mongo(self) -> dict[str, Any]:
        """Plain dict for insertion (enums as values, datetimes kept)."""
        return self.model_dump(mode="python")


class CandidateState(StrEnum):
    """Where a candidate is in the pipeline; every candidate has exactly one."""

    GENERATED = "generated"  # in the database, workflow added, not predicted yet
    PASSED = "passed"  # predicted and passed the screen
    SCREENED_OUT = "screened_out"  # predicted above the threshold: children defused
    UNIQUE = "unique"  # kept by dedup, waiting for relax
    DUPLICATE = "duplicate"  # matches a lower-energy candidate (unrelaxed, or after the funnel's relaxation): children defused
    PRERELAXED = "prerelaxed"  # relaxed by the funnel's potential and passed its cut: waiting for the final relax
    FUNNEL_CUT = "funnel_cut"  # relaxed by the funnel's potential, above its cut on the ML hull: children defused
    OVER_BUDGET = "over_budget"  # its relaxation would exceed relax.budget: waits for `amdflow budget`
    RELAXED = "relaxed"  # relaxation finished, task doc written
    ANALYZED = "analyzed"  # formation energy and hull position known
    FAILED = "failed"  # a stage raised; see `error`


class CampaignDoc(_Doc):
    """A campaign: its validated settings and the versions that produced its results."""

    name: str
    chemsys: str
    elements: list[str]
    config: dict[str, Any]
    config_hash: str
    run_type: str = Field(description="Engine + settings key; thermo never mixes run types.")
    funnel_run_type: str | None = Field(None, description="The funnel's potential (its own ML hull); None: no funnel.")
    output_dir: str
    code_version: str
    model_id: str | None = Field(None, description="sha256 of the CGCNN checkpoint used.")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class TemplateRef(_Doc):
    """Where a candidate's template came from."""

    source: str = Field(description="'aflow', 'folder', 'mp' or 'random'.")
    template_id: str = Field(description="AFLOW label, the file path relative to the folder, a material id, or "
                             "'<composition>#<index>' of a random search.")
    formula: str = Field(description="Reduced formula of the template.")


class Prediction(_Doc):
    """A CGCNN prediction and the screen's decision."""

    formation_energy_per_atom: float = Field(description="Predicted, eV/atom.")
    model_id: str = Field(description="sha256 of the checkpoint file.")
    model_name: str
    threshold: float = Field(description="Formation-energy threshold used, eV/atom.")
    passed: bool
    mode: str = Field("threshold", description="Screening mode: threshold, hull or top_k.")
    e_above_hull: float | None = Field(None, description="hull mode: predicted eV/atom above the current hull.")
    reason: str | None = Field(None, description="Why the candidate was screened out.")
    unscreened: bool = Field(False, description="Passed whatever the prediction: a random search's structure "
                             "(screen.random_pass); the funnel's relaxed energy ranks it.")


class DedupRecord(_Doc):
    """The dedup stage's decision."""

    duplicate_of: str | None = Field(None, description="Representative candidate id, if duplicate.")
    compared: int = Field(description="Representatives of its bucket compared against (StructureMatcher fits).")


class FunnelRecord(_Doc):
    """The funnel's relaxation of a candidate (a universal potential) and its decision on the ML hull."""

    engine: str = Field(description="'chgnet' or 'sevennet'.")
    model: str = Field(description="The potential, e.g. 'SevenNet-0 (11Jul2024; MPtrj)'.")
    run_type: str = Field(description="The ML hull this energy belongs to (never mixed with DFT).")
    task_id: str | None = Field(description="Task document of the ML relaxation (None: ml_failed).")
    energy_per_atom: float | None = Field(description="ML energy of the relaxed structure on the run type's scale, eV/atom "
                                          "(None: ml_failed).")
    converged: bool
    n_steps: int
    max_force: float | None = Field(description="Largest residual force (cell included), eV/Angstrom.")
    formation_energy_per_atom: float | None = Field(None, description="vs the same potential's elemental references, eV/atom.")
    e_above_hull: float | None = Field(None, description="On the ML hull of the funnel's run type, eV/atom; None: no hull yet.")
    max_e_above_hull: float = Field(description="The cut applied, eV/atom.")
    rank: int | None = Field(None, description="1-based rank of its ML energy among its formula's funnel-relaxed candidates.")
    passed: bool = Field(description="Goes on to the final relax.")
    deferred: bool = Field(False, description="Passed without a hull (the potential's references not relaxed yet): "
                           "the relax Firework's check decides.")
    duplicate_of: str | None = Field(None, description="Relaxed into the same crystal as this candidate (lower ML energy).")
    reason: str | None = Field(None, description="Why it does not go to the final relax.")
    checked_at_relax: dict[str, Any] | None = Field(None, description="The decision again just before the final relax.")
    ml_failed: bool = Field(False, description="The potential's relaxation tripped its guard (a hole of the potential): "
                            "passed on unranked, after every ranked candidate, from its own cell.")
    ml_error: str | None = Field(None, description="ml_failed: what the guard saw.")
    stopped_early: bool = Field(False, description="A random-search start stopped after the funnel's first pass (far "
                                "above its composition's lowest): energy_per_atom is that of its partial relaxation.")
    hole: bool = Field(False, description="A random-search start whose relaxation fell into a hole of the potential (its "
                       "guard tripped, or a formation energy below the hull's floor): cut, not passed on; a random start "
                       "is one draw of many, and the search's other starts stand for it (ml_error says what was seen).")


class CandidateDoc(_Doc):
    """One substituted structure."""

    candidate_id: str = Field(description="Content hash of campaign + canonical structure.")
    campaign: str
    formula: str = Field(description="Reduced formula.")
    chemsys: str
    elements: list[str]
    nsites: int
    structure: dict[str, Any] = Field(description="pymatgen Structure.as_dict(verbosity=0) of the unrelaxed candidate.")
    template: TemplateRef
    substitution: dict[str, str] = Field(description="Template element -> target element.")
    lattice_scale: float = Field(1.0, description="Linear factor applied after the volume rule.")
    min_bond_ratio: float | None = Field(None, description="Its shortest interatomic distance over the sum of the two "
                                         "atoms' covalent radii, as generated (generate.min_bond_ratio is the floor).")
    random: dict[str, Any] | None = Field(None, description="A random search's structure (template source 'random'): "
                                          "its index, seed, space_group and z (formula units).")
    state: CandidateState = CandidateState.GENERATED
    prediction: Prediction | None = None
    dedup_bucket: int | None = Field(None, description="Sites in the StructureMatcher's reduced cell: candidates of one "
                                     "formula in different buckets never match (set by the dedup stage).")
    dedup: DedupRecord | None = None
    funnel: FunnelRecord | None = None
    task_id: str | None = None
    thermo: dict[str, Any] | None = Field(None, description="Hull summary after analyze (eV/atom).")
    error: str | None = None
    resume: dict[str, Any] | None = Field(None, description="Relaxation stopped at the walltime: its last structure and "
                                          "folder; the rerun continues from it.")
    relax_started_at: datetime | None = Field(None, description="When its final relaxation started (budget slot taken): "
                                              "from then on the funnel's second dedup keeps it.")
    round: int | None = Field(None, description="The active-learning round whose share of relax.budget its final "
                              "relaxation took (campaigns with rounds).")
    fw_ids: dict[str, int] = Field(default_factory=dict, description="Stage name -> Firework id.")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class TaskDoc(_Doc):
    """A relaxation result (atomate-like task document)."""

    task_id: str
    kind: str = Field(description="'candidate', 'reference' or 'known'.")
    level: str = Field("final", description="'final': the campaign's relax engine; 'funnel': the funnel's potential.")
    round: int | None = Field(None, description="The active-learning round whose share this final relaxation took "
                              "(campaigns with rounds).")
    candidate_id: str | None = None
    campaign: str | None = None
    formula: str
    chemsys: str
    elements: list[str]
    nsites: int
    run_type: str
    engine: str
    engine_note: str
    input_structure: dict[str, Any]
    final_structure: dict[str, Any]
    energy: float = Field(description="Total energy of the final structure on the run type's scale (its correction "
                          "scheme applied), eV: what the hull uses.")
    energy_per_atom: float = Field(description="eV/atom, on the run type's scale.")
    uncorrected_energy: float | None = Field(None, description="Total energy as the engine computed it, eV.")
    correction: float = Field(0.0, description="energy - uncorrected_energy, eV (MP2020's anion and +U mixing terms).")
    correction_scheme: str = Field("none", description="'mp2020' (applied), 'mp2020-in-model' (the potential's own), 'none'.")
    energy_adjustments: list[dict[str, Any]] = Field(default_factory=list, description="Each correction term: name, value (eV).")
    converged: bool
    n_steps: int
    max_force: float = Field(description="Largest residual force, eV/Angstrom.")
    run_time_s: float
    settings: dict[str, Any]
    details: dict[str, Any] = Field(default_factory=dict, description="Engine-specific results (VASP: convergence of forces and "
                                    "stress, magnetization, Custodian corrections, INCAR/KPOINTS/POTCARs of the final run).")
    labels: list[dict[str, Any]] | None = Field(None, description="level 'final': the engine's first and last ionic "
                                                "steps (structure, raw energy eV, forces eV/A, stress 3x3 eV/A^3 with "
                                                "ASE's sign), the labels `rounds.retrain: [potential]` fine-tunes on.")
    dir_name: str | None = None
    known_id: str | None = Field(None, description="kind 'known': the imported known phase relaxed.")
    source: str | None = Field(None, description="kind 'known': where the phase was imported from (e.g. 'mp:mp-1234').")
    reference: dict[str, Any] | None = Field(None, description="kind 'reference': element, prototype asked for, structure "
                                             "relaxed (the ground state, or a fallback after a tripped guard) and its name.")
    created_at: datetime = Field(default_factory=utcnow)


class ReferenceDoc(_Doc):
    """One comparison relaxation: an elemental reference (the lowest per element and run type
    is used) or an imported known phase recomputed the campaign's way (kind 'known')."""

    ref_id: str
    element: str = Field(description="The element, or a known phase's formula.")
    prototype: str = Field(description="The elemental prototype, or the known phase's known_id.")
    run_type: str
    kind: str = Field("element", description="'element' or 'known'.")
    state: str = Field("pending", description="'pending', 'relaxed' or 'failed'.")
    energy_per_atom: float | None = None
    task_id: str | None = None
    structure: str | None = Field(None, description="The structure relaxed: 'ground_state', an AFLOW label, or the fallback "
                                  "relaxed in its place.")
    name: str | None = Field(None, description="The structure's name for people.")
    tried: list[dict[str, Any]] | None = Field(None, description="Structures whose relaxation tripped the potential's guard.")
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ThermoDoc(_Doc):
    """Hull position of one relaxed material within a chemical system."""

    material_id: str = Field(description="task_id of the relaxation.")
    candidate_id: str | None = None
    campaign: str | None = None
    kind: str = Field("candidate", description="'candidate', 'reference' or 'known' (imported known phase).")
    source: str | None = Field(None, description="Known phases: where they were imported from (e.g. 'mp:mp-1234').")
    formula: str
    chemsys: str = Field(description="The material's own chemical system.")
    hull_chemsys: str = Field(description="The system whose hull was built.")
    run_type: str
    energy_per_atom: float
    formation_energy_per_atom: float = Field(description="vs the elemental references, eV/atom.")
    e_above_hull: float = Field(description="vs the hull of all computed phases, eV/atom.")
    e_above_known_hull: float | None = Field(
        None, description="vs the hull of the references and known phases only, eV/atom; negative = below all known phases.")
    is_stable: bool
    in_hull: bool = Field(True, description="False: placed on the hull but not shaping it (an unconverged relaxation).")
    decomposes_to: list[dict[str, Any]] = Field(default_factory=list)
    built_at: datetime = Field(default_factory=utcnow)


#: collection -> list of (keys, unique) index specs; one per query the code makes.
COLLECTIONS: dict[str, list[tuple[list[tuple[str, int]], bool]]] = {
    "campaigns": [([("name", 1)], True)],
    "candidates": [
        ([("candidate_id", 1)], True),
        # a candidate by id (or id prefix) within its campaign, every field in one index (`amdflow show`, the API)
        ([("campaign", 1), ("candidate_id", 1)], False),  # equality, then the prefix range
        ([("campaign", 1), ("state", 1)], False),
        # dedup's queries (and any per formula): every field of each is in the index, in order
        ([("campaign", 1), ("formula", 1), ("prediction.passed", 1), ("dedup_bucket", 1)], False),
    ],
    "tasks": [
        ([("task_id", 1)], True),
        ([("run_type", 1), ("chemsys", 1)], False),
        ([("candidate_id", 1)], False),  # `amdflow show`, Campaign.candidate_tasks
    ],
    "references": [
        ([("ref_id", 1)], True),
        ([("run_type", 1), ("element", 1)], False),
    ],
    "locks": [],  # short-lived claims (unique _id), e.g. one dedup decision per formula at a time
    "thermo": [
        ([("material_id", 1), ("hull_chemsys", 1)], True),
        ([("campaign", 1), ("e_above_hull", 1)], False),
        ([("run_type", 1), ("hull_chemsys", 1)], False),
        # status, report and analyze: every field of each query in one index (explain-checked by the tests)
        ([("run_type", 1), ("hull_chemsys", 1), ("is_stable", 1), ("campaign", 1)], False),
        ([("run_type", 1), ("hull_chemsys", 1), ("campaign", 1), ("e_above_hull", 1)], False),
        ([("run_type", 1), ("hull_chemsys", 1), ("candidate_id", 1)], False),
        ([("candidate_id", 1)], False),  # `amdflow show`, Campaign.candidate_thermo: every hull a candidate is on
    ],
    # one record per (run type, hull system): the sources digest of its last build
    "thermo_builds": [([("run_type", 1), ("hull_chemsys", 1)], True)],
    # imported known phases (pymatgen entries / Materials Project)
    "known": [
        ([("known_id", 1)], True),
        ([("run_type", 1), ("chemsys", 1)], False),
        ([("candidate_id", 1)], False),  # `amdflow show`, Campaign.candidate_tasks
    ],
}
