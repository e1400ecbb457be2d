from __future__ import annotations

import math

import pytest
from pymatgen.core import Lattice, Structure

from amdflow.campaign import campaign_from_dict
from amdflow.errors import TemplateError
from amdflow.generate import GenerateReport, candidate_id, generate_candidates, substitutions
from amdflow.generate.substitute import substitute
from amdflow.generate.volume import atomic_volume


def cfg(elements, templates, **extra):
    return campaign_from_dict({"name": "t", "elements": elements, "templates": templates, **extra})


@pytest.mark.parametrize(("k", "n", "expected"), [(2, 2, 2), (2, 3, 6), (3, 3, 6), (3, 4, 24), (4, 4, 24), (2, 5, 20)])
def test_substitution_counts(k, n, expected):
    template_elements = ["Na", "Cl", "K", "Br"][:k]
    targets = ["Fe", "Al", "Ni", "Co", "Cu"][:n]
    subs = substitutions(template_elements, targets)
    assert len(subs) == expected == math.perm(n, k)
    assert len({tuple(s.values()) for s in subs}) == expected
    assert all(len(set(s.values())) == k for s in subs)


def test_aflow_templates_counts_and_skips():
    # Heusler (3 elements), B2 (2), and the quaternary-free library filter at max_sites 4.
    c = cfg(["Fe", "Al", "Ni"], [{"source": "aflow", "prototypes": ["AB2C_cF16_225_a_c_b", "AB_cP2_221_b_a"]}])
    report = GenerateReport()
    docs = list(generate_candidates(c, report))
    assert report.templates.read == 2
    by_template = {}
    for d in docs:
        by_template.setdefault(d.template.template_id, []).append(d)
    assert len(by_template["AB2C_cF16_225_a_c_b"]) == 6
    # B2: the 6 ordered pairs are 6 distinct structures in the template's coordinates
    assert len(by_template["AB_cP2_221_b_a"]) == 6
    assert {d.formula for d in by_template["AB_cP2_221_b_a"]} == {"AlFe", "AlNi", "FeNi"}
    assert all(d.state == "generated" for d in docs)


def test_templates_with_more_elements_than_targets_are_skipped_with_reason():
    c = cfg(["Fe", "Al"], [{"source": "aflow", "prototypes": ["AB2C_cF16_225_a_c_b", "AB_cP2_221_b_a"]}])
    report = GenerateReport()
    docs = list(generate_candidates(c, report))
    assert len(docs) == 2
    assert report.templates.skipped == [("aflow:AB2C_cF16_225_a_c_b", "3 distinct elements but only 2 target elements")]


def test_unknown_prototype_label():
    c = cfg(["Fe", "Al"], [{"source": "aflow", "prototypes": ["NOT_A_LABEL"]}])
    with pytest.raises(TemplateError, match="unknown AFLOW prototype"):
        list(generate_candidates(c))


def test_ids_are_deterministic_and_site_order_free():
    s = Structure(Lattice.cubic(3.0), ["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    s_rev = Structure(Lattice.cubic(3.0), ["Al", "Fe"], [[0.5, 0.5, 0.5], [1.0, 0, 0]])
    assert candidate_id("a", s) == candidate_id("a", s_rev)
    assert candidate_id("a", s) != candidate_id("b", s)
    c = cfg(["Fe", "Al"], [{"source": "aflow", "prototypes": ["AB3_cP4_221_a_c"]}])
    assert [d.candidate_id for d in generate_candidates(c)] == [d.candidate_id for d in generate_candidates(c)]


def test_volume_rule_known_answer():
    # fcc Cu -> Fe: volume scales by v(Fe)/v(Cu) = 7.09/7.11 (molar volumes, cm^3/mol)
    cu = Structure(Lattice.cubic(3.61), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    fe = substitute(cu, {"Cu": "Fe"})
    assert fe.volume == pytest.approx(cu.volume * 7.09 / 7.11, rel=1e-6)
    assert atomic_volume("Fe") == pytest.approx(7.09e24 / 6.02214076e23)
    same = substitute(cu, {"Cu": "Fe"}, scale_volume=False)
    assert same.volume == pytest.approx(cu.volume)


def test_folder_source(tmp_path):
    folder = tmp_path / "templates"
    (folder / "sub").mkdir(parents=True)
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    nacl.to(filename=str(folder / "NaCl.cif"))
    nacl.get_primitive_structure().to(filename=str(folder / "sub" / "POSCAR"), fmt="poscar")
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    disordered = Structure(Lattice.cubic(3), [{"Fe": 0.5, "Al": 0.5}, "Ni"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    disordered.to(filename=str(folder / "dis.cif"))
    c = cfg(["Fe", "Al"], [{"source": "folder", "path": str(folder)}])
    report = GenerateReport()
    docs = list(generate_candidates(c, report))
    assert report.templates.read == 2
    reasons = dict(report.templates.skipped)
    assert "unreadable" in reasons["folder:broken.cif"]
    assert reasons["folder:dis.cif"] == "disordered or partially occupied"
    assert {d.template.template_id for d in docs} == {"NaCl.cif", "sub/POSCAR"}
    assert len(docs) == 4  # two templates x two assignments


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(TemplateError, match="does not exist"):
        list(generate_candidates(cfg(["Fe", "Al"], [{"source": "folder", "path": str(tmp_path / "none")}])))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TemplateError, match="holds no"):
        list(generate_candidates(cfg(["Fe", "Al"], [{"source": "folder", "path": str(tmp_path / "empty")}])))
