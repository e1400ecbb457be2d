"""Every element's ground-state structure: the default elemental reference of every hull.

The Materials Project convention (``../shared/design/energies-and-search.md``): an
element's reference is its lowest-energy computed phase, e.g. graphite-like C, alpha-B,
diamond Si, alpha-Mn, the molecular crystals of H2, N2, O2 and the halogens (MP's fitted
anion corrections assume those solid references). fcc/bcc/hcp alone, amdflow's old
default, put C, B, P, S, Se, Ga, In, Mn, the halogens and the gases far too high, which
makes every compound holding them look too stable.

Where the structures come from, honestly: the ground-state *entries* of MP (matbench-
discovery's ``2023-02-07-mp-elemental-reference-entries``, MIT; MP data CC BY 4.0) hold
each element's material id, cell size and energy but no structure, and MP itself cannot
be reached from here. So each element's structure is built from the crystallography of
MP's ground state: a prototype of pymatgen's bundled AFLOW library (MIT; Mehl et al.
2017) decorated with the element (or, for H2, its space group and Wyckoff position),
scaled to the element's own volume (pymatgen's molar volume). :data:`GROUND_STATES`
records, per element, MP's material id and cell size and how closely the structure built
here agrees with MP's:

* ``same``: MP's structure type (checked against its space group and cell size);
* ``size``: a structure with MP's cell size whose type is inferred (the 9R and dhcp
  lanthanides, the alpha-/beta-Mn-type alkali metals that PBE puts a meV below bcc, ...);
* ``differs``: MP's lowest GGA phase is one this library cannot build (fibrous red P,
  one-atom Br/I/Bi/Mg/Cd cells, ...); the experimental ground state is used and
  ``note`` says what MP has. ``scripts/validate_formation.py`` measures the energy each
  such choice costs (the relaxed energy against MP's, per element).

The structures ship built in ``amdflow/data/element_ground_states.json.gz``
(``scripts/make_element_ground_states.py`` writes it from this table), so a pymatgen
release that edits its prototype library does not move a reference; the tests check the
shipped file against this table.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from pymatgen.core import Lattice, Structure

from amdflow.campaign import (
    GROUND_STATE,  # noqa: F401  (re-exported: the stage and the tests name it here)
)
from amdflow.errors import AmdflowError

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "element_ground_states.json.gz"
#: Bumped when a shipped structure changes: reference ids and run records carry it.
DATA_VERSION = 1

Agreement = Literal["same", "size", "differs"]


@dataclass(frozen=True)
class GroundState:
    """One element's ground state: where its structure comes from and how it compares with MP's."""

    element: str
    mp_id: str  # MP's lowest-energy elemental entry (2023-02-07)
    mp_nsites: int  # atoms in MP's cell
    name: str  # what the structure is, for people
    recipe: str  # an AFLOW label ('A_...' decorated with the element; 'AB2_hP3_191_a_d' every site the element), or 'H2'
    agreement: Agreement
    note: str = ""


def _gs(el: str, mp_id: str, n: int, name: str, recipe: str, agreement: Agreement = "same", note: str = "") -> GroundState:
    return GroundState(el, mp_id, n, name, recipe, agreement, note)


FCC, BCC, HCP, DHCP, SM9R = "A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c", "A_hP4_194_ac", "A_hR3_166_ac"
ALPHA_MN, BETA_MN, A14 = "A_cI58_217_ac2g", "A_cP20_213_cd", "A_oC8_64_f#3"
_CLOSE = "PBE puts the close-packed stackings and bcc of this metal within a few meV/atom of each other"

#: Every element of MP's elemental reference set (89), in MP's order of the source file.
GROUND_STATES: dict[str, GroundState] = {g.element: g for g in [
    _gs("H", "mp-24504", 4, "solid H2 (hcp of molecules along c, P6_3/mmc)", "H2", "size",
        "MP's 4-atom cell; the packing of its H2 molecules is not checked here"),
    _gs("He", "mp-23158", 1, "fcc", FCC, "size"),
    _gs("Li", "mp-1018134", 3, "9R (alpha-Sm type, R-3m)", SM9R),
    _gs("Be", "mp-87", 2, "hcp", HCP),
    _gs("B", "mp-160", 12, "alpha-B (R-3m)", "A_hR12_166_2h"),
    _gs("C", "mp-2516584", 4, "graphite (A9, P6_3/mmc)", "A_hP4_194_bc", "same",
        "MP's PBE relaxation leaves the layers far apart (c = 24.8 A): PBE barely binds them"),
    _gs("N", "mp-25", 8, "alpha-N2 (cubic P2_13)", "A_cP8_198_2a", "size"),
    _gs("O", "mp-723285", 8, "alpha-O2 (C2/m)", "A_mC4_12_i", "differs",
        "MP's lowest O entry is an 8-atom O2 packing; O2 packings lie within meV/atom of each other in PBE"),
    _gs("F", "mp-561203", 4, "F2 molecular crystal (alpha-O2 type, C2/m)", "A_mC4_12_i", "differs",
        "MP's is alpha-F2 (C2/c, 4 atoms), a packing this library has no prototype of"),
    _gs("Ne", "mp-111", 1, "fcc", FCC),
    _gs("Na", "mp-1186081", 29, "alpha-Mn type (I-43m)", ALPHA_MN, "size", _CLOSE),
    _gs("Mg", "mp-1056702", 1, "hcp", HCP, "differs", f"MP's lowest entry is a 1-atom cell; {_CLOSE}"),
    _gs("Al", "mp-134", 1, "fcc", FCC),
    _gs("Si", "mp-149", 2, "diamond", "A_cF8_227_a"),
    _gs("P", "mp-1198724", 42, "Hittorf's violet P (P2/c)", "A_mP84_13_21g", "differs",
        "MP's is fibrous red P (P-1, 42 atoms), the same tubular family; black P is 0.02 eV/atom above MP's"),
    _gs("S", "mp-96", 32, "alpha-S (S8 rings, Fddd)", "A_oF128_70_4h"),
    _gs("Cl", "mp-1008394", 4, "solid Cl2 (Cmce, A14)", A14, "size"),
    _gs("Ar", "mp-23155", 1, "fcc", FCC),
    _gs("K", "mp-1184905", 20, "beta-Mn type (P4_132)", BETA_MN, "size", _CLOSE),
    _gs("Ca", "mp-45", 1, "fcc", FCC),
    _gs("Sc", "mp-67", 2, "hcp", HCP),
    _gs("Ti", "mp-72", 3, "omega-Ti (P6/mmm)", "AB2_hP3_191_a_d"),
    _gs("V", "mp-146", 1, "bcc", BCC),
    _gs("Cr", "mp-90", 2, "bcc (2-atom cell: room for MP's antiferromagnetic order)", BCC),
    _gs("Mn", "mp-35", 29, "alpha-Mn (I-43m)", ALPHA_MN),
    _gs("Fe", "mp-13", 1, "bcc", BCC),
    _gs("Co", "mp-54", 2, "hcp", HCP),
    _gs("Ni", "mp-23", 1, "fcc", FCC),
    _gs("Cu", "mp-30", 1, "fcc", FCC),
    _gs("Zn", "mp-79", 2, "hcp", HCP),
    _gs("Ga", "mp-142", 4, "alpha-Ga (Cmce)", "A_oC8_64_f"),
    _gs("Ge", "mp-32", 2, "diamond", "A_cF8_227_a"),
    _gs("As", "mp-11", 2, "alpha-As (A7, R-3m)", "A_hR2_166_c#3"),
    _gs("Se", "mp-570481", 64, "red (monoclinic) Se, Se8 rings (P2_1/c)", "A_mP64_14_16e"),
    _gs("Br", "mp-998864", 1, "solid Br2 (Cmce, A14)", A14, "differs",
        "MP's lowest Br entry is a 1-atom cell; solid Br2 (Cmce) is the experimental ground state"),
    _gs("Kr", "mp-612118", 1, "fcc", FCC, "size"),
    _gs("Rb", "mp-1179656", 8, "bcc", BCC, "differs", f"MP's lowest Rb entry is an 8-atom cell; {_CLOSE}"),
    _gs("Sr", "mp-1187073", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Y", "mp-1187739", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Zr", "mp-131", 2, "hcp", HCP),
    _gs("Nb", "mp-75", 1, "bcc", BCC),
    _gs("Mo", "mp-129", 1, "bcc", BCC),
    _gs("Tc", "mp-113", 2, "hcp", HCP),
    _gs("Ru", "mp-33", 2, "hcp", HCP),
    _gs("Rh", "mp-74", 1, "fcc", FCC),
    _gs("Pd", "mp-2", 1, "fcc", FCC),
    _gs("Ag", "mp-989737", 3, "9R (alpha-Sm type, R-3m)", SM9R),
    _gs("Cd", "mp-1096861", 1, "hcp", HCP, "differs", f"MP's lowest Cd entry is a 1-atom cell; {_CLOSE}"),
    _gs("In", "mp-1184502", 3, "In (body-centred tetragonal, A6)", "A_tI2_139_a#2", "differs",
        "MP's lowest In entry is a 3-atom cell; bct In is the experimental ground state"),
    _gs("Sn", "mp-117", 2, "alpha-Sn (diamond)", "A_cF8_227_a"),
    _gs("Sb", "mp-104", 2, "alpha-As type (A7, R-3m)", "A_hR2_166_c#3"),
    _gs("Te", "mp-19", 3, "trigonal Te (A8, P3_121)", "A_hP3_152_a"),
    _gs("I", "mp-639751", 1, "solid I2 (Cmce, A14)", A14, "differs",
        "MP's lowest I entry is a 1-atom cell; solid I2 (Cmce) is the experimental ground state"),
    _gs("Xe", "mp-972256", 1, "fcc", FCC, "size"),
    _gs("Cs", "mp-1184151", 29, "alpha-Mn type (I-43m)", ALPHA_MN, "same", _CLOSE),
    _gs("Ba", "mp-122", 1, "bcc", BCC),
    _gs("La", "mp-26", 4, "dhcp (alpha-La)", DHCP),
    _gs("Ce", "mp-567332", 2, "fcc (alpha/gamma-Ce)", FCC, "differs", "MP's lowest Ce entry is a 2-atom cell"),
    _gs("Pr", "mp-38", 4, "dhcp", DHCP),
    _gs("Nd", "mp-123", 4, "dhcp", DHCP),
    _gs("Pm", "mp-867200", 4, "dhcp", DHCP, "size"),
    _gs("Sm", "mp-69", 4, "dhcp", DHCP, "size", "experimentally 9R (alpha-Sm); MP's lowest is a 4-atom cell"),
    _gs("Eu", "mp-623532", 1, "bcc", BCC),
    _gs("Gd", "mp-155", 2, "hcp", HCP),
    _gs("Tb", "mp-11698", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Dy", "mp-10658", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Ho", "mp-10659", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Er", "mp-1184115", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Tm", "mp-1018122", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Yb", "mp-972364", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", _CLOSE),
    _gs("Lu", "mp-145", 2, "hcp", HCP),
    _gs("Hf", "mp-103", 2, "hcp", HCP),
    _gs("Ta", "mp-50", 1, "bcc", BCC),
    _gs("W", "mp-91", 1, "bcc", BCC),
    _gs("Re", "mp-8", 2, "hcp", HCP),
    _gs("Os", "mp-49", 2, "hcp", HCP),
    _gs("Ir", "mp-101", 1, "fcc", FCC),
    _gs("Pt", "mp-126", 1, "fcc", FCC),
    _gs("Au", "mp-81", 1, "fcc", FCC),
    _gs("Hg", "mp-1184554", 2, "alpha-Hg (A10, R-3m)", "A_hR1_166_a", "differs", "MP's lowest Hg entry is a 2-atom cell"),
    _gs("Tl", "mp-972351", 3, "9R (alpha-Sm type, R-3m)", SM9R, "size", f"experimentally hcp; {_CLOSE}"),
    _gs("Pb", "mp-20483", 1, "fcc", FCC),
    _gs("Bi", "mp-567597", 1, "alpha-As type (A7, R-3m)", "A_hR2_166_c#3", "differs",
        "MP's lowest Bi entry is a 1-atom cell; A7 Bi is the experimental ground state"),
    _gs("Ac", "mp-862690", 4, "dhcp", DHCP, "size"),
    _gs("Th", "mp-37", 1, "fcc", FCC),
    _gs("Pa", "mp-10740", 1, "body-centred tetragonal Pa", "A_tI2_139_a"),
    _gs("U", "mp-44", 2, "alpha-U (Cmcm)", "A_oC4_63_c"),
    _gs("Np", "mp-11534", 8, "alpha-Np (Pnma)", "A_oP8_62_2c"),
    _gs("Pu", "mp-571261", 2, "gamma-Pu type (Fddd)", "A_oF8_70_a", "size"),
]}

#: Molecular crystals (MP's convention: the fitted anion corrections assume these solid references) and their
#: molecules' bond lengths (A; gas-phase experimental values, CRC Handbook): scaling a cell to the element's volume
#: must not stretch the molecule (alpha-O2 scaled to O's molar volume had O-O at 1.54 A, I2-type Cl2 Cl-Cl at 2.42 A).
MOLECULAR_BOND: dict[str, float] = {"H": 0.741, "N": 1.098, "O": 1.208, "F": 1.412, "Cl": 1.988, "Br": 2.281, "I": 2.666}


def ground_state_info(element: str) -> GroundState:
    """The table row of ``element``; one clear error for an element MP has no reference of."""
    try:
        return GROUND_STATES[element]
    except KeyError:
        raise AmdflowError(f"no ground-state structure ships for element {element!r} (MP's reference set holds "
                           f"{len(GROUND_STATES)} elements): give it relax.reference_prototypes and set "
                           "relax.reference_ground_state: false") from None


def _atomic_volume(symbol: str) -> float:
    from amdflow.generate.volume import atomic_volume

    return atomic_volume(symbol)


def _solid_h2() -> Structure:
    """hcp of H2 molecules along c (P6_3/mmc, 4f): a = 3.77, c = 6.16 A, H-H 0.74 A, 19 A^3/atom."""
    c, bond = 6.16, 0.74
    return Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(3.77, c), ["H"], [[1 / 3, 2 / 3, 0.25 - bond / 2 / c]])


def build_ground_state(element: str) -> Structure:
    """Build ``element``'s ground-state structure from its recipe (what the shipped file holds).

    An AFLOW prototype decorated with the element, then scaled to the element's own volume
    per atom (pymatgen's molar volume), so every element starts from one rule. Cr gets the
    conventional 2-atom bcc cell (MP's, which holds its antiferromagnetic order).
    """
    from amdflow.generate.templates import aflow_structure

    gs = ground_state_info(element)
    if gs.recipe == "H2":
        s = _solid_h2()
    else:
        proto = aflow_structure(gs.recipe)
        s = proto.copy()
        s.replace_species({str(el): element for el in proto.composition.elements})
        if gs.element == "Cr":
            from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

            s = SpacegroupAnalyzer(s).get_conventional_standard_structure()
        s.scale_lattice(_atomic_volume(element) * len(s))
        if element in MOLECULAR_BOND:
            s = _restore_bonds(s, MOLECULAR_BOND[element])
    return Structure(s.lattice, s.species, s.frac_coords)  # no site properties, no charges


def _restore_bonds(s: Structure, bond: float) -> Structure:
    """Each atom and its nearest neighbour are one molecule: put them ``bond`` apart about their centre."""
    import numpy as np

    cart = s.cart_coords.copy()
    dm = s.distance_matrix + np.eye(len(s)) * 1e9
    done: set[int] = set()
    for i in range(len(s)):
        if i in done:
            continue
        j = int(np.argmin(dm[i]))
        if int(np.argmin(dm[j])) != i:
            raise AmdflowError(f"{s.composition.reduced_formula}: site {i} has no molecular partner")
        _, image = s[i].distance_and_image(s[j])
        partner = s.lattice.get_cartesian_coords(s[j].frac_coords + image)
        centre, axis = (cart[i] + partner) / 2, (partner - cart[i]) / np.linalg.norm(partner - cart[i])
        cart[i], cart[j] = centre - axis * bond / 2, centre + axis * bond / 2 - s.lattice.get_cartesian_coords(image)
        done |= {i, j}
    return Structure(s.lattice, s.species, cart, coords_are_cartesian=True)


@cache
def _shipped() -> dict[str, dict]:
    if not DATA_FILE.is_file():
        raise AmdflowError(f"{DATA_FILE} is missing from this amdflow installation: reinstall amdflow "
                           "(or run scripts/make_element_ground_states.py in a source checkout)")
    with gzip.open(DATA_FILE, "rt") as fh:
        data = json.load(fh)
    if data.get("version") != DATA_VERSION:
        raise AmdflowError(f"{DATA_FILE} is version {data.get('version')}, this amdflow reads {DATA_VERSION}: reinstall amdflow")
    return data["structures"]


def ground_state_structure(element: str) -> Structure:
    """The shipped ground-state structure of ``element`` (a fresh copy)."""
    ground_state_info(element)
    return Structure.from_dict(_shipped()[element])


def ground_state_label(element: str) -> str:
    """How reports name the structure: 'alpha-B (R-3m) [ground state; MP mp-160]'."""
    gs = ground_state_info(element)
    return f"{gs.name} [ground state; MP {gs.mp_id}{'' if gs.agreement == 'same' else ', ' + gs.agreement}]"


def write_shipped(path: Path = DATA_FILE) -> Path:
    """Build every element's structure and write the shipped file (``scripts/make_element_ground_states.py``)."""
    structures = {el: build_ground_state(el).as_dict(verbosity=0) for el in GROUND_STATES}
    for d in structures.values():
        d.pop("properties", None)
    payload = {"version": DATA_VERSION, "source": "amdflow.thermo.ground_states.build_ground_state (pymatgen's AFLOW "
               "prototype library, MIT; MP ids from matbench-discovery's 2023-02-07 elemental reference entries, MIT, "
               "MP data CC BY 4.0)", "structures": structures}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as fh:  # mtime 0: the same table writes the same bytes
        fh.write(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    tmp.replace(path)
    return path
