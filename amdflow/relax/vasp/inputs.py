"""VASP inputs from pymatgen's input sets, with one policy for candidates and references.

exa-AMD wrote fixed INCARs without KPOINTS and paired POTCARs with the user's element
string. Here every input comes from a pymatgen input set (MP's relax/static family by
default) built for the structure itself, so POTCARs follow the structure's own species
order, and one :class:`~amdflow.campaign.VaspConfig` decides everything that matters for
comparing energies: functional, ENCUT, k-point density (per reciprocal volume, so a
1-atom reference and a 20-atom candidate get the same sampling), spin, +U, POTCAR choice
and the user's INCAR overrides. Candidates and elemental references call the same
function; :func:`settings_fingerprint` is what a test compares between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pymatgen.core import Element, Structure

from amdflow.campaign import HubbardPolicy, SpinPolicy, VaspConfig, VaspInputFamily
from amdflow.errors import AmdflowError

#: INCAR tags whose value the input set derives per structure by a fixed rule.
PER_STRUCTURE_TAGS = ("MAGMOM", "EDIFF", "LDAUU", "LDAUJ", "LDAUL", "NELECT", "NBANDS", "NUPDOWN")


def _set_classes(family: VaspInputFamily) -> tuple[type, type]:
    from pymatgen.io.vasp.sets import MPRelaxSet, MPScanRelaxSet, MPScanStaticSet, MPStaticSet

    return {VaspInputFamily.MP: (MPRelaxSet, MPStaticSet), VaspInputFamily.MP_R2SCAN: (MPScanRelaxSet, MPScanStaticSet)}[family]


def is_magnetic(structure: Structure) -> bool:
    """Whether the structure holds an element with unpaired d or f electrons (the transition metals and lanthanides/actinides)."""
    return any(Element(str(el)).is_transition_metal or Element(str(el)).is_rare_earth for el in structure.composition.elements)


def incar_policy(structure: Structure, cfg: VaspConfig) -> dict[str, Any]:
    """The user_incar_settings amdflow passes to the input set (None removes a tag)."""
    incar: dict[str, Any] = {}
    spin_on = cfg.spin is SpinPolicy.ON or (cfg.spin is SpinPolicy.AUTO and is_magnetic(structure))
    if not spin_on:
        incar.update(ISPIN=1, MAGMOM=None)
    if cfg.hubbard is HubbardPolicy.OFF:
        incar.update(LDAU=False, LDAUU=None, LDAUJ=None, LDAUL=None, LDAUTYPE=None, LDAUPRINT=None, LMAXMIX=None)
    incar.update(cfg.incar)  # the user's word is last
    return incar


def input_set(structure: Structure, cfg: VaspConfig, kind: str = "relax") -> Any:
    """The pymatgen input set for one run (``kind``: relax or static) of ``structure``."""
    relax_cls, static_cls = _set_classes(VaspInputFamily(cfg.input_set))
    cls = {"relax": relax_cls, "static": static_cls}[kind]
    kwargs: dict[str, Any] = {
        "user_incar_settings": incar_policy(structure, cfg),
        "user_kpoints_settings": {"reciprocal_density": cfg.kpoint_density},
        "user_potcar_settings": dict(cfg.potcars) or None,
    }
    if cfg.potcar_functional:
        kwargs["user_potcar_functional"] = cfg.potcar_functional
    return cls(structure, **kwargs)


def write_inputs(structure: Structure, cfg: VaspConfig, directory: Path, kind: str = "relax", potcar_spec: bool = False) -> Path:
    """Write INCAR, KPOINTS, POSCAR and POTCAR (or POTCAR.spec, symbols only, for tests) into ``directory``.

    A missing POTCAR folder or element is one clear error naming the fix.
    """
    vis = input_set(structure, cfg, kind)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        vis.write_input(str(directory), potcar_spec=potcar_spec)
    except (OSError, ValueError, RuntimeError) as err:
        text = str(err)
        if "POTCAR" in text or "PMG_VASP_PSP_DIR" in text or "psp" in text.lower():
            raise AmdflowError(f"VASP POTCARs not found for {structure.composition.reduced_formula}: set PMG_VASP_PSP_DIR "
                               f"(pymatgen's POTCAR folder, see `pmg config`) or fix relax.vasp.potcars ({text.splitlines()[0]})") from err
        raise
    return directory


def settings_fingerprint(structure: Structure, cfg: VaspConfig, kind: str = "relax") -> dict[str, Any]:
    """What must be identical between any two runs whose energies are compared.

    Every INCAR tag except the per-structure ones (:data:`PER_STRUCTURE_TAGS`), plus the
    rules behind those (EDIFF per atom, MAGMOM and U per element), the k-point density,
    the POTCAR functional and the POTCAR symbol chosen for each element present.
    """
    vis = input_set(structure, cfg, kind)
    incar = dict(vis.incar)
    n = len(structure)
    fp: dict[str, Any] = {k: v for k, v in incar.items() if k not in PER_STRUCTURE_TAGS}
    if "EDIFF" in cfg.incar:  # the user fixed it: the same number everywhere
        fp["EDIFF"] = incar["EDIFF"]
    elif "EDIFF" in incar:  # the input set's rule: EDIFF per atom
        fp["EDIFF_PER_ATOM"] = round(float(incar["EDIFF"]) / n, 12)
    if "MAGMOM" in incar:
        written = vis.poscar.structure  # the input set may sort the sites: pair MAGMOMs with what it writes
        fp["MAGMOM_BY_ELEMENT"] = {str(site.specie): float(m) for site, m in zip(written, incar["MAGMOM"], strict=True)}
    if incar.get("LDAU"):
        fp["U_BY_ELEMENT"] = dict(zip(vis.poscar.site_symbols, incar.get("LDAUU", []), strict=False))
    fp["reciprocal_density"] = cfg.kpoint_density
    fp["potcar_functional"] = vis.potcar_functional
    fp["potcar_by_element"] = dict(zip(vis.poscar.site_symbols, vis.potcar_symbols, strict=True))
    return fp


def settings_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Differences between two fingerprints; per-element entries compared on the elements both hold."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            for el in sorted(set(va) & set(vb)):
                if va[el] != vb[el]:
                    diffs.append(f"{key}[{el}]: {va[el]!r} != {vb[el]!r}")
        elif va != vb:
            diffs.append(f"{key}: {va!r} != {vb!r}")
    return diffs
