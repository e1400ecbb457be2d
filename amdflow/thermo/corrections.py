"""Energy corrections: one scale per hull, named in the run type, recorded on every task.

The Materials Project's formation energies and hulls use MP2020-corrected GGA/GGA+U energies
(pymatgen's :class:`~pymatgen.entries.compatibility.MaterialsProject2020Compatibility`: fitted
anion corrections for O, N, H, the halogens, chalcogenides, ... and the GGA/GGA+U mixing energies
of the +U metals). Uncorrected GGA and GGA+U energies are not comparable, and corrected and
uncorrected energies never share a hull. Per engine (:func:`policy_for`):

* **VASP, ``input_set: mp``** (MPRelaxSet: PBE, MP's +U and POTCARs): ``mp2020``, applied by amdflow
  to every task from the run's own parameters (+U values, POTCARs).
* **VASP, ``mp_r2scan``**: ``none``. MP2020 is fitted to GGA/GGA+U only (pymatgen refuses other
  run types); MP's own r2SCAN hull uses r2SCAN energies as they are.
* **SevenNet-0, -l3i5 and MF-0's PBE modal**: ``mp2020``, applied with MP's parameters for the
  structure (MPRelaxSet's +U where MP would use it). They were trained on MPtrj's uncorrected
  energies; Matbench Discovery applies MP2020 to their predictions the same way
  (``models/sevennet/join_7net_preds.py``: "SevenNet-0 is trained on uncorrected energy of MPtrj,
  MP formation energy corrections need to be applied").
* **SevenNet-MF-0's R2SCAN modal**: ``none`` (r2SCAN energies, as above).
* **CHGNet**: ``mp2020-in-model``. CHGNet was trained on MP2020-corrected energies (its README:
  "The pretrained dataset of CHGNet comes from GGA+U DFT with MaterialsProject2020Compatibility
  corrections applied"; Matbench Discovery applies none to it): its energies are already on the
  MP2020 scale, and correcting them again would count the correction twice.
* **CP2K** (GTH pseudopotentials, MOLOPT basis): ``none``. MP2020's fits are for MP's VASP settings.
* **A fine-tuned SevenNet checkpoint**: what ``funnel.correction`` says (the labels it was tuned on decide).

The scheme's name is part of every run type, so the hull builder, which never mixes run types,
never mixes corrected and uncorrected energies either; it also checks (``amdflow.builders.thermo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import Any

from pymatgen.core import Composition, Structure

from amdflow.errors import AmdflowError


class CorrectionScheme(StrEnum):
    """The correction a run type's energies carry."""

    NONE = "none"  # energies as computed (r2SCAN, CP2K): the uncorrected scale
    MP2020 = "mp2020"  # amdflow applies MaterialsProject2020Compatibility
    IN_MODEL = "mp2020-in-model"  # the potential predicts MP2020-corrected energies itself (CHGNet): nothing applied


#: The energy scale of each scheme: a hull holds one scale only.
SCALE = {CorrectionScheme.NONE: "uncorrected", CorrectionScheme.MP2020: "mp2020", CorrectionScheme.IN_MODEL: "mp2020"}


class CorrectionError(AmdflowError):
    """MP2020 cannot correct this entry (pymatgen's CompatibilityError, in one line)."""


@dataclass(frozen=True)
class Corrected:
    """An energy on its hull's scale (eV, total) and what was added to the computed one."""

    energy: float
    uncorrected_energy: float
    scheme: CorrectionScheme
    adjustments: list[dict[str, Any]] = field(default_factory=list)  # name, value (eV), description

    @property
    def correction(self) -> float:
        return self.energy - self.uncorrected_energy


@cache
def _mp_config() -> dict[str, Any]:
    from pymatgen.io.vasp.sets import MPRelaxSet

    return MPRelaxSet.CONFIG


def mp_hubbards(composition: Composition) -> dict[str, float]:
    """The +U values (eV) MPRelaxSet gives this composition: MP's rule, the U of its most electronegative element's
    table (oxides and fluorides of the listed metals), non-zero values only. Pure; no POTCAR needed."""
    elements = sorted((el for el in composition.elements if composition[el] > 0), key=lambda e: e.X)
    table = _mp_config()["INCAR"]["LDAUU"].get(elements[-1].symbol)
    if not isinstance(table, dict):
        return {}
    return {el.symbol: float(table[el.symbol]) for el in elements if float(table.get(el.symbol, 0) or 0) > 0}


def mp_parameters(composition: Composition, hubbards: dict[str, float] | None = None) -> dict[str, Any]:
    """The entry parameters MP2020 reads, for energies computed the MP way (``hubbards``: None = MP's rule)."""
    u = mp_hubbards(composition) if hubbards is None else {k: float(v) for k, v in hubbards.items() if float(v) > 0}
    potcars = _mp_config()["POTCAR"]
    return {"run_type": "GGA+U" if u else "GGA", "is_hubbard": bool(u), "hubbards": u,
            "potcar_symbols": [f"PBE {potcars.get(el.symbol, el.symbol)}" for el in composition.elements]}


@cache
def _mp2020() -> Any:
    import warnings

    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # check_potcar off: ML energies have no POTCARs, and a VASP run's POTCARs are the input set's by construction
        return MaterialsProject2020Compatibility(check_potcar=False)


def correct(structure: Structure, energy: float, scheme: CorrectionScheme | str,
            parameters: dict[str, Any] | None = None) -> Corrected:
    """``energy`` (eV, total, of ``structure``) on ``scheme``'s scale.

    ``parameters`` (run_type GGA/GGA+U, is_hubbard, hubbards) describe how the energy was computed;
    default: the MP way (:func:`mp_parameters`), what an ML potential trained on MPtrj emulates.
    Raises :class:`CorrectionError` when MP2020 refuses the entry.
    """
    scheme = CorrectionScheme(scheme)
    if scheme is not CorrectionScheme.MP2020:
        return Corrected(float(energy), float(energy), scheme)
    import warnings

    from pymatgen.entries.compatibility import CompatibilityError
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    params = parameters if parameters is not None else mp_parameters(structure.composition)
    entry = ComputedStructureEntry(structure, float(energy), parameters=dict(params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            adjustments = _mp2020().get_adjustments(entry)
        except CompatibilityError as err:
            reason = str(err).split(" for {")[0].replace("\n", " ")  # pymatgen appends the whole entry as a dict
            raise CorrectionError(f"MP2020 cannot correct {structure.composition.reduced_formula} ({params.get('run_type')}, "
                                  f"U {params.get('hubbards') or {}}): {reason}: compute it with MP's +U (hubbard: mp)") from None
    total = float(energy) + sum(float(a.value) for a in adjustments)
    return Corrected(total, float(energy), scheme, [{"name": a.name, "value": float(a.value), "description": a.description}
                                                    for a in adjustments])


@dataclass(frozen=True)
class CorrectionPolicy:
    """The scheme an engine's energies get, and why (shown by `amdflow status` and the report)."""

    scheme: CorrectionScheme
    why: str

    @property
    def scale(self) -> str:
        return SCALE[self.scheme]


#: SevenNet checkpoints trained on MPtrj's uncorrected PBE(+U) energies (modal None or PBE).
SEVENNET_UNCORRECTED_TRAINING = ("7net-0", "7net-0_22may2024", "7net-l3i5", "7net-mf-0")


def policy_for(engine: str, cfg: Any) -> CorrectionPolicy:
    """The correction policy of an engine (``chgnet``, ``sevennet``, ``vasp``, ``cp2k``) with its settings ``cfg``
    (a FunnelConfig for the funnel's potential, a RelaxConfig for the final engine)."""
    if engine == "chgnet":
        return CorrectionPolicy(CorrectionScheme.IN_MODEL, "CHGNet predicts MP2020-corrected energies (trained on them)")
    if engine == "sevennet":
        explicit = getattr(cfg, "correction", "auto")
        if explicit not in (None, "auto"):
            return CorrectionPolicy(CorrectionScheme(explicit), "funnel.correction")
        if getattr(cfg, "checkpoint", None):
            raise AmdflowError("funnel.checkpoint: a fine-tuned SevenNet checkpoint needs funnel.correction (mp2020 when "
                               "it was tuned on uncorrected PBE(+U) energies, none for r2SCAN or already corrected labels)")
        modal = (getattr(cfg, "modal", None) or "PBE").upper()
        if cfg.model in SEVENNET_UNCORRECTED_TRAINING and modal == "PBE":
            return CorrectionPolicy(CorrectionScheme.MP2020, f"{cfg.model} was trained on MPtrj's uncorrected PBE(+U) energies")
        return CorrectionPolicy(CorrectionScheme.NONE, f"{cfg.model} modal {modal}: r2SCAN energies, which MP2020 does not cover")
    if engine == "vasp":
        if str(cfg.vasp.input_set) == "mp":
            return CorrectionPolicy(CorrectionScheme.MP2020, "VASP with MP's input set (PBE, MP's +U): MP2020, MP's own scheme")
        return CorrectionPolicy(CorrectionScheme.NONE, "r2SCAN: MP2020 covers GGA/GGA+U only; MP's r2SCAN hull is uncorrected")
    if engine == "cp2k":
        return CorrectionPolicy(CorrectionScheme.NONE, "CP2K (GTH, MOLOPT): MP2020 is fitted to MP's VASP settings")
    raise AmdflowError(f"no correction policy for engine {engine!r}")


def energy_on_scale(entry: Any, scale: str) -> float:
    """An imported entry's energy per atom (eV/atom) on ``scale`` ('mp2020' or 'uncorrected'), or a clear error.

    'uncorrected': its computed energy (the correction it carried removed). 'mp2020': MP2020 applied
    again from the entry's own parameters (run type, +U), so an entry carrying another scheme's or
    a stale correction is put on the scale of the hull it joins.
    """
    if scale == "uncorrected":
        return float(entry.uncorrected_energy_per_atom)
    params = dict(getattr(entry, "parameters", None) or {})
    if params.get("run_type") not in ("GGA", "GGA+U"):
        names = [getattr(a, "name", "") for a in getattr(entry, "energy_adjustments", [])]
        if (names and all("MP2020" in n for n in names)) or (not names and entry.composition.is_element):
            return float(entry.energy_per_atom)  # already MP2020 (or an element, which MP2020 leaves alone)
        raise CorrectionError(f"known phase {entry.entry_id}: its parameters name no GGA/GGA+U run type, so its energy "
                              "cannot be put on the MP2020 scale of this hull: give entries with parameters (mp-api's "
                              "have them), or use analyze.known_phases.energies: relax")
    structure = getattr(entry, "structure", None)
    if structure is None:
        from pymatgen.entries.computed_entries import ComputedEntry

        plain = ComputedEntry(entry.composition, entry.uncorrected_energy, parameters=params, data=dict(entry.data or {}))
        import warnings

        from pymatgen.entries.compatibility import CompatibilityError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                adj = _mp2020().get_adjustments(plain)
            except CompatibilityError as err:
                reason = str(err).split(" for {")[0].replace("\n", " ")
                raise CorrectionError(f"known phase {entry.entry_id}: MP2020 refuses it: {reason}") from None
        return (float(entry.uncorrected_energy) + sum(float(a.value) for a in adj)) / entry.composition.num_atoms
    return correct(structure, entry.uncorrected_energy, CorrectionScheme.MP2020, params).energy / len(structure)
