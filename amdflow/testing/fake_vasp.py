"""A fake VASP executable for tests: real-format outputs from a cheap model, and real error messages on demand.

Use it as the VASP command (``python -m amdflow.testing.fake_vasp``). Like VASP it reads
INCAR, POSCAR, KPOINTS and POTCAR (or POTCAR.spec, symbols only) from the working
folder, refuses inconsistent inputs with VASP's kind of message, and writes
vasprun.xml, OUTCAR, OSZICAR, CONTCAR and its stdout in formats pymatgen and Custodian
parse. Energies come from a cheap, deterministic model (elemental energies from
electronegativity, a Miedema-like mixing term, a harmonic volume term around the summed
atomic volumes); an ionic relaxation (NSW > 0, ISIF >= 3) moves the volume towards the
model's minimum, one ionic step at a time. Metals get a partly occupied band, so
Custodian's IncorrectSmearingHandler sees what it would see with VASP.

Error injection: ``AMDFLOW_FAKE_VASP_ERROR=zbrent`` (a comma-separated list of Custodian
``VaspErrorHandler`` error names) prints that error's message (the real VASP stdout from
``$AMDFLOW_FAKE_VASP_ERRORS_DIR/<name>/vasp.out`` when that folder exists, e.g.
``../shared/vasp/errors``; else the message Custodian looks for) and exits 1. The error
comes back on every run until the inputs change, so a test proves that Custodian's
correction was applied before the next run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import sys
import time
from pathlib import Path

EV_PER_A3_TO_KBAR = 1602.1766
BULK_MODULUS = 0.5  # eV/Angstrom^3, the model's stiffness


def _fail(message: str, code: int = 1) -> int:
    print(message, flush=True)
    return code


def _vasp_inputs():
    """pymatgen.io.vasp.inputs without the package's ``__init__``.

    That ``__init__`` imports pymatgen.io.vasp.outputs and sets (scipy.signal and more): 3.3-4.7 s of start-up
    per run measured here, against 0.6-0.9 s for inputs alone. Custodian waits for each run, so a test campaign's
    twenty fake runs spent most of their time importing. The package's own module is restored afterwards: a later
    ``import pymatgen.io.vasp`` (Custodian's handlers) runs its ``__init__`` and finds this same inputs module.
    """
    if "pymatgen.io.vasp" in sys.modules:
        return sys.modules["pymatgen.io.vasp"].inputs
    import importlib
    import types

    import pymatgen.io

    stub = types.ModuleType("pymatgen.io.vasp")
    stub.__path__ = [str(Path(next(iter(pymatgen.io.__path__))) / "vasp")]
    sys.modules["pymatgen.io.vasp"] = stub
    try:
        return importlib.import_module("pymatgen.io.vasp.inputs")
    except ImportError:  # a pymatgen whose inputs need the package: import it whole
        sys.modules.pop("pymatgen.io.vasp.inputs", None)
        sys.modules.pop("pymatgen.io.vasp", None)
        return importlib.import_module("pymatgen.io.vasp.inputs")
    finally:
        if sys.modules.get("pymatgen.io.vasp") is stub:
            del sys.modules["pymatgen.io.vasp"]


def read_inputs(folder: Path) -> tuple[dict, object, object, list[str]]:
    """INCAR, Poscar, Kpoints and POTCAR symbols; raises ValueError with a VASP-like message."""
    inputs = _vasp_inputs()
    Incar, Kpoints, Poscar = inputs.Incar, inputs.Kpoints, inputs.Poscar

    for name in ("INCAR", "POSCAR", "KPOINTS"):
        if not (folder / name).exists():
            raise ValueError(f" ERROR: the file {name} is missing (fake VASP)")
    incar = Incar.from_file(folder / "INCAR")
    poscar = Poscar.from_file(folder / "POSCAR", check_for_potcar=False)
    kpoints = Kpoints.from_file(folder / "KPOINTS")
    if (folder / "POTCAR.spec").exists():
        symbols = (folder / "POTCAR.spec").read_text().split()
    elif (folder / "POTCAR").exists():
        symbols = [p.symbol for p in _vasp_inputs().Potcar.from_file(folder / "POTCAR")]
    else:
        raise ValueError(" ERROR: the file POTCAR is missing (fake VASP)")
    species = poscar.site_symbols
    if len(symbols) != len(species) or any(sym.split("_")[0] != el for sym, el in zip(symbols, species, strict=False)):
        raise ValueError(f" ERROR: the type of ions in POSCAR {species} does not match the POTCAR {symbols} (fake VASP)")
    return dict(incar), poscar, kpoints, symbols


def model_energy(structure) -> tuple[float, float]:
    """(total energy in eV, equilibrium volume in Angstrom^3) of the cheap model."""
    from pymatgen.core import Element

    comp = structure.composition
    n = comp.num_atoms
    e = 0.0
    v0 = 0.0
    for el, amt in comp.items():
        x = Element(str(el)).X if not math.isnan(Element(str(el)).X) else 1.5
        e += amt * (-3.0 - 0.5 * x)
        r = Element(str(el)).atomic_radius or 1.4
        v0 += amt * 4.0 / 3.0 * math.pi * float(r) ** 3 * 1.35
    fracs = {str(el): amt / n for el, amt in comp.items()}
    els = list(fracs)
    for i, a in enumerate(els):
        for b in els[i + 1:]:
            xa, xb = Element(a).X, Element(b).X
            e -= n * 4 * fracs[a] * fracs[b] * 0.15 * (xa - xb) ** 2
    v = structure.volume
    e += 0.5 * BULK_MODULUS * (v - v0) ** 2 / v0
    return e, v0


def _inject(folder: Path) -> str | None:
    """The error to print this run, if any (once per set of inputs)."""
    names = [n.strip() for n in os.environ.get("AMDFLOW_FAKE_VASP_ERROR", "").split(",") if n.strip()]
    if not names:
        return None
    digest = hashlib.sha256(b"".join((folder / f).read_bytes() for f in ("INCAR", "POSCAR", "KPOINTS"))).hexdigest()
    marker = folder / ".fake_vasp_errors"
    seen = marker.read_text().split() if marker.exists() else []
    done = [line.split(":", 1)[0] for line in seen]
    for name in names:
        if name not in done:  # first time: inject, remember these inputs
            marker.write_text("\n".join([*seen, f"{name}:{digest}"]) + "\n")
            return name
        if f"{name}:{digest}" in seen:  # same inputs as when it failed: nothing was corrected, fail again
            return name
    return None


def _error_text(name: str) -> str:
    folder = os.environ.get("AMDFLOW_FAKE_VASP_ERRORS_DIR")
    if folder and (Path(folder) / name / "vasp.out").exists():
        return (Path(folder) / name / "vasp.out").read_text(errors="replace")
    from custodian.vasp.handlers import VaspErrorHandler

    msgs = VaspErrorHandler.error_msgs.get(name)
    if not msgs:
        raise SystemExit(f"fake VASP: unknown error name {name!r}; use one of {sorted(VaspErrorHandler.error_msgs)}")
    return " running on    1 total cores\n" + "\n".join(f" {m}" for m in msgs) + "\n"


def main(argv: list[str] | None = None) -> int:
    folder = Path.cwd()
    try:
        incar, poscar, kpoints, symbols = read_inputs(folder)
    except ValueError as err:
        return _fail(str(err))
    error = _inject(folder)
    print(" running on    1 total cores\n vasp.6.4.2 (fake: amdflow.testing.fake_vasp)\n POSCAR found :  "
          f"{len(poscar.site_symbols)} types and {len(poscar.structure)} ions", flush=True)
    if error:
        print(_error_text(error), flush=True)
        return 1
    structure = poscar.structure.copy()
    nsw = int(incar.get("NSW", 0))
    ibrion = int(incar.get("IBRION", -1 if nsw == 0 else 0))
    isif = int(incar.get("ISIF", 2))
    ediffg = float(incar.get("EDIFFG", 10 * float(incar.get("EDIFF", 1e-4))))
    steps = []
    e_prev = None
    step_s = float(os.environ.get("AMDFLOW_FAKE_VASP_STEP_S", "0"))  # tests: slow ionic steps (walltime)
    stopped = False
    for step in range(max(nsw, 1)):
        e, v0 = model_energy(structure)
        pressure = -BULK_MODULUS * (structure.volume - v0) / v0  # eV/A^3, positive = wants to expand
        steps.append((structure.copy(), e, pressure))
        print(f" DAV:   1    {e:.8E}   {e:.5E}   -0.1E+00    64   0.1E+00\n {step + 1} F= {e:.8E} E0= {e:.8E}  d E ={0.0:.6E}", flush=True)
        if step_s:
            time.sleep(step_s)
            # VASP writes OUTCAR as it goes; Custodian's WalltimeHandler reads the LOOP+ timings from it
            with open(folder / "OUTCAR", "a") as fh:
                fh.write(f" vasp.6.4.2 (fake)\n     LOOP+:  cpu time    {step_s:.4f}: real time    {step_s:.4f}\n")
        relaxing = nsw > 0 and ibrion in (1, 2, 3) and isif >= 3
        if (folder / "STOPCAR").exists() and "LSTOP" in (folder / "STOPCAR").read_text().upper():
            stopped = True  # like VASP: finish this ionic step, write the outputs, stop
            break
        if not relaxing or step == nsw - 1:
            break
        if e_prev is not None and ((ediffg > 0 and abs(e - e_prev) < ediffg) or abs(pressure) * EV_PER_A3_TO_KBAR < 0.5):
            break
        e_prev = e
        structure.scale_lattice(structure.volume + 0.6 * (v0 - structure.volume))
    write_outputs(folder, incar, poscar, kpoints, symbols, steps)
    if stopped:
        print(" LSTOP = .TRUE. found in STOPCAR: stopping after this ionic step", flush=True)
        return 0
    print(" reached required accuracy - stopping structural energy minimisation" if nsw > 0 else " writing wavefunctions", flush=True)
    return 0


# ---------------------------------------------------------------- writers
def _i(name: str, value) -> str:
    if isinstance(value, bool):
        return f'  <i type="logical" name="{name}"> {"T" if value else "F"}  </i>'
    if isinstance(value, int):
        return f'  <i type="int" name="{name}">{value:>6d}</i>'
    if isinstance(value, float):
        return f'  <i name="{name}">{value:16.8f}</i>'
    if isinstance(value, (list, tuple)):
        kind = ' type="int"' if all(isinstance(x, int) and not isinstance(x, bool) for x in value) else ""
        return f'  <v{kind} name="{name}">' + " ".join(str(x) for x in value) + " </v>"
    return f'  <i type="string" name="{name}">{value}</i>'


def _structure_xml(structure, name: str | None = None) -> str:
    lat = structure.lattice
    head = f' <structure name="{name}" >' if name else " <structure>"
    basis = "\n".join(f"    <v>{row[0]:17.8f}{row[1]:17.8f}{row[2]:17.8f} </v>" for row in lat.matrix)
    rec = "\n".join(f"    <v>{row[0]:17.8f}{row[1]:17.8f}{row[2]:17.8f} </v>" for row in lat.reciprocal_lattice_crystallographic.matrix)
    pos = "\n".join(f"   <v>{c[0]:17.8f}{c[1]:17.8f}{c[2]:17.8f} </v>" for c in structure.frac_coords)
    return (f'{head}\n  <crystal>\n   <varray name="basis" >\n{basis}\n   </varray>\n   <i name="volume">{lat.volume:17.8f} </i>\n'
            f'   <varray name="rec_basis" >\n{rec}\n   </varray>\n  </crystal>\n  <varray name="positions" >\n{pos}\n  </varray>\n </structure>')


def _energy_xml(e: float, indent: str) -> str:
    return (f"{indent}<energy>\n{indent} <i name=\"e_fr_energy\">{e:17.8f} </i>\n{indent} <i name=\"e_wo_entrp\">{e:17.8f} </i>\n"
            f"{indent} <i name=\"e_0_energy\">{e:17.8f} </i>\n{indent}</energy>")


def write_outputs(folder: Path, incar: dict, poscar, kpoints, symbols: list[str], steps: list) -> None:
    from pymatgen.core import Element

    Poscar = _vasp_inputs().Poscar
    final = steps[-1][0]
    species = poscar.site_symbols
    counts = poscar.natoms
    ispin = int(incar.get("ISPIN", 1))
    nelm = int(incar.get("NELM", 60))
    magmom = list(incar.get("MAGMOM", [0.6] * len(final))) if ispin == 2 else [0.0] * len(final)
    moments = [0.5 * float(m) if Element(str(s.specie)).is_transition_metal or Element(str(s.specie)).is_rare_earth else 0.0
               for s, m in zip(final, magmom, strict=False)]
    params = {"NELM": nelm, "NSW": int(incar.get("NSW", 0)), "IBRION": int(incar.get("IBRION", -1)), "ISIF": int(incar.get("ISIF", 2)),
              "EDIFFG": float(incar.get("EDIFFG", -0.05)), "ISPIN": ispin, "GGA": str(incar.get("GGA", "--")),
              "METAGGA": str(incar.get("METAGGA", "None")), "LHFCALC": False, "AEXX": 0.0, "HFSCREEN": 0.0, "LUSE_VDW": False,
              "LDAU": bool(incar.get("LDAU", False)), "ISMEAR": int(incar.get("ISMEAR", 1)), "SIGMA": float(incar.get("SIGMA", 0.2)),
              "ENMAX": float(incar.get("ENCUT", 400.0))}
    lines = ['<?xml version="1.0" encoding="ISO-8859-1"?>', "<modeling>", " <generator>",
             '  <i name="program" type="string">vasp </i>', '  <i name="version" type="string">6.4.2  </i>',
             '  <i name="subversion" type="string">fake (amdflow.testing.fake_vasp) </i>', '  <i name="platform" type="string">LinuxIFC </i>',
             f'  <i name="date" type="string">{_dt.datetime.now(_dt.UTC):%Y %m %d} </i>',
             f'  <i name="time" type="string">{_dt.datetime.now(_dt.UTC):%H:%M:%S} </i>', " </generator>", " <incar>"]
    for k, v in incar.items():
        lines.append(_i(k, v))
    lines.append(" </incar>")
    divisions = list(kpoints.kpts[0]) if kpoints.kpts else [1, 1, 1]
    style = "Gamma" if str(kpoints.style).lower().endswith("gamma") else "Monkhorst-Pack"
    lines += [" <kpoints>", f'  <generation param="{style}">', f'   <v type="int" name="divisions">{" ".join(f"{int(d):8d}" for d in divisions)} </v>',
              '   <v name="usershift">       0.00000000       0.00000000       0.00000000 </v>', "  </generation>",
              '  <varray name="kpointlist" >', "   <v>       0.00000000       0.00000000       0.00000000 </v>", "  </varray>",
              '  <varray name="weights" >', "   <v>       1.00000000 </v>", "  </varray>", " </kpoints>",
              " <parameters>", '  <separator name="general" >']
    lines += [_i(k, v) for k, v in params.items()]
    lines += ["  </separator>", " </parameters>", " <atominfo>", f"  <atoms>{len(final):8d} </atoms>", f"  <types>{len(species):8d} </types>",
              '  <array name="atoms" >', '   <dimension dim="1">ion</dimension>', '   <field type="string">element</field>',
              '   <field type="int">atomtype</field>', "   <set>"]
    for t, (el, n) in enumerate(zip(species, counts, strict=True), start=1):
        lines += [f"    <rc><c>{el:2s}</c><c>{t:4d}</c></rc>"] * n
    lines += ["   </set>", "  </array>", '  <array name="atomtypes" >', '   <dimension dim="1">type</dimension>',
              '   <field type="int">atomspertype</field>', '   <field type="string">element</field>', "   <field>mass</field>",
              "   <field>valence</field>", '   <field type="string">pseudopotential</field>', "   <set>"]
    for el, n, sym in zip(species, counts, symbols, strict=True):
        lines.append(f"    <rc><c>{n:4d}</c><c>{el:2s}</c><c>{float(Element(el).atomic_mass):16.8f}</c><c>{8.0:16.8f}</c>"
                     f"<c>  PAW_PBE {sym} 01Jan2000                  </c></rc>")
    lines += ["   </set>", "  </array>", " </atominfo>", _structure_xml(steps[0][0], "initialpos")]
    for s, e, pressure in steps:
        lines.append(" <calculation>")
        for k in range(4):  # a converging SCF, well under NELM
            lines += ["  <scstep>", _energy_xml(e + 0.1 / 10 ** k, "   "), "  </scstep>"]
        lines.append(_structure_xml(s))
        lines += ['  <varray name="forces" >'] + ["   <v>       0.00000000       0.00000000       0.00000000 </v>"] * len(s) + ["  </varray>"]
        p = -pressure * EV_PER_A3_TO_KBAR  # VASP's sign: negative stress = wants to expand
        lines += ['  <varray name="stress" >', f"   <v>{p:17.8f}{0.0:17.8f}{0.0:17.8f} </v>", f"   <v>{0.0:17.8f}{p:17.8f}{0.0:17.8f} </v>",
                  f"   <v>{0.0:17.8f}{0.0:17.8f}{p:17.8f} </v>", "  </varray>", _energy_xml(e, "  "), " </calculation>"]
    lines.append(_structure_xml(final, "finalpos"))
    # one k-point, eight bands: a metal gets a half-filled band at the Fermi level (zero gap), others a gap
    metal = any(Element(el).is_metal for el in species) and all(Element(el).is_metal or Element(el).is_metalloid for el in species)
    eig = [(-6.0 + i, 1.0 if i < 5 else 0.0) for i in range(8)]
    if metal:  # an empty band just below the highest occupied one: the bands cross, zero gap
        eig[5] = (eig[4][0] - 0.1, 0.0)
    lines += [" <eigenvalues>", "  <array>", '   <dimension dim="1">band</dimension>', '   <dimension dim="2">kpoint</dimension>',
              '   <dimension dim="3">spin</dimension>', "   <field>eigene</field>", "   <field>occ</field>", "   <set>"]
    for spin in range(1, ispin + 1):
        lines += [f'    <set comment="spin {spin}">', '     <set comment="kpoint 1">']
        lines += [f"      <r>{en:12.4f}{occ:12.4f} </r>" for en, occ in eig]
        lines += ["     </set>", "    </set>"]
    lines += ["   </set>", "  </array>", " </eigenvalues>", " <dos>", f'  <i name="efermi">{-2.0 + (0.0 if metal else -0.5):12.8f} </i>', " </dos>",
              "</modeling>"]
    (folder / "vasprun.xml").write_text("\n".join(lines) + "\n")
    Poscar(final).write_file(folder / "CONTCAR")
    osz = []
    for k, (_, e, _) in enumerate(steps, start=1):
        osz.append("       N       E                     dE             d eps       ncg     rms          rms(c)")
        for j in range(4):
            osz.append(f"DAV:   {j + 1}    {e + 0.1 / 10 ** j: .12E}   {-0.1 / 10 ** j: .5E}   -0.1E+00    64   0.1E+00")
        mag = f"  mag={sum(moments): .4f}" if ispin == 2 else ""
        osz.append(f"   {k} F= {e: .8E} E0= {e: .8E}  d E ={0.0: .6E}{mag}")
    (folder / "OSZICAR").write_text("\n".join(osz) + "\n")
    e = steps[-1][1]
    out = [" vasp.6.4.2 (fake: amdflow.testing.fake_vasp)", f"   ENCUT  = {params['ENMAX']:8.1f} eV", f"   NELM   = {nelm}",
           f"   ISPIN  =      {ispin}    spin polarized calculation?", f"   IBRION =     {params['IBRION']}    ionic relax: 0-MD 1-quasi-New 2-CG",
           "   LNONCOLLINEAR =      F non collinear calculations", "   number of bands    NBANDS=      8",
           "   total plane-waves  NPLWV =   32768", "",
           "   k-point   1 :   0.0000 0.0000 0.0000  plane waves:    1000", "",
           "   total drift:                                0.000000     0.000000     0.000000",
           " ----------------------------------------------------------------------------------",
           "  FREE ENERGIE OF THE ION-ELECTRON SYSTEM (eV)", "  ---------------------------------------------------",
           f"  free  energy   TOTEN  = {e:18.8f} eV", "", f"  energy  without entropy= {e:18.8f}  energy(sigma->0) = {e:18.8f}", ""]
    if ispin == 2:
        out += [f" number of electron      32.0000000 magnetization {sum(moments):12.7f}", "", " magnetization (x)", "",
                "# of ion       s       p       d       tot", "------------------------------------------"]
        out += [f"{i + 1:4d}        0.000   0.000 {m:7.3f} {m:7.3f}" for i, m in enumerate(moments)]
        out += ["--------------------------------------------------", f"tot          0.000   0.000 {sum(moments):7.3f} {sum(moments):7.3f}", ""]
    out += [" General timing and accounting informations for this job:", " ========================================================", "",
            "                  Total CPU time used (sec):        1.000", "                            User time (sec):        0.900",
            "                          System time (sec):        0.100", "                         Elapsed time (sec):        1.234", "",
            "                   Maximum memory used (kb):       10000.", "                   Average memory used (kb):          N/A", ""]
    (folder / "OUTCAR").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
