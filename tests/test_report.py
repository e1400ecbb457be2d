"""Plots (binary to quaternary), promising/ and the HTML report, checked in headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from amdflow.report import PlotPoint, PromisingRow, plot_phase_diagram, write_promising
from amdflow.report.html import ReportData, render_report, write_report
from amdflow.report.plot import hull_edges, phase_diagram_figure, simplex_coords, spread_labels
from amdflow.thermo import EntryKind, HullEntry, hull_analysis

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make chromium` (as root: apt-get install chromium) "
                                                              "installs Debian's package for the report test")


def _points(entries: list[HullEntry]) -> list[PlotPoint]:
    return [PlotPoint(r.entry_id, r.formula, r.formation_energy_per_atom, r.e_above_hull, r.is_stable, r.kind.value)
            for r in hull_analysis(entries)]


def quaternary_entries() -> list[HullEntry]:
    refs = [HullEntry(el, el, e, kind=EntryKind.REFERENCE) for el, e in (("Li", -1.9), ("Fe", -8.3), ("P", -5.4), ("O", -4.9))]
    known = [HullEntry("k1", "Li2O", -4.8, kind=EntryKind.KNOWN), HullEntry("k2", "Fe2O3", -6.8, kind=EntryKind.KNOWN),
             HullEntry("k3", "FeP", -7.2, kind=EntryKind.KNOWN), HullEntry("k4", "Li3PO4", -5.9, kind=EntryKind.KNOWN)]
    cands = [HullEntry("c1", "LiFePO4", -6.6), HullEntry("c2", "LiFeO2", -5.9), HullEntry("c3", "Li2FeP2O7", -6.1),
             HullEntry("c4", "FePO4", -6.2)]
    return refs + known + cands


def test_simplex_coordinates_known_answers():
    assert simplex_coords("Fe", ["Fe", "Li", "O"]) == pytest.approx([0, 0])
    assert simplex_coords("O", ["Fe", "Li", "O"]) == pytest.approx([0.5, np.sqrt(3) / 2])
    # 1/4 Fe at (0, 0) + 1/4 Li at (1, 0) + 1/2 O at (1/2, sqrt(3)/2)
    assert simplex_coords("FeLiO2", ["Fe", "Li", "O"]) == pytest.approx([0.5, np.sqrt(3) / 4])
    tet = [simplex_coords(el, ["Fe", "Li", "O", "P"]) for el in ("Fe", "Li", "O", "P")]
    edges = [np.linalg.norm(a - b) for i, a in enumerate(tet) for b in tet[i + 1:]]
    assert edges == pytest.approx([1.0] * 6)  # a regular tetrahedron
    assert simplex_coords("AlNi3", ["Al", "Ni"]) == pytest.approx([0.75])


def test_hull_edges_are_the_tie_lines():
    pts = _points([HullEntry("Al", "Al", -3.7, kind=EntryKind.REFERENCE), HullEntry("Ni", "Ni", -5.5, kind=EntryKind.REFERENCE),
                   HullEntry("a", "AlNi", -5.3), HullEntry("b", "AlNi3", -5.5), HullEntry("c", "Al3Ni", -4.0)])
    edges = {tuple(sorted((a.formula, b.formula))) for a, b in hull_edges(pts, ["Al", "Ni"])}
    assert edges == {("Al", "AlNi"), ("AlNi", "AlNi3"), ("AlNi3", "Ni")}  # Al3Ni is above the hull: no tie line


@pytest.mark.parametrize("elements", [["Li", "Fe", "O"], ["Li", "Fe", "P", "O"]], ids=["ternary", "quaternary"])
def test_ternary_and_quaternary_plots(tmp_path, elements):
    entries = [e for e in quaternary_entries() if {el.symbol for el in e.to_computed_entry().composition.elements} <= set(elements)]
    pts = _points(entries)
    files = plot_phase_diagram(pts, elements, tmp_path / "pd.png", tmp_path / "pd.html", title="test", max_e_above_hull=0.5)
    assert files.png.stat().st_size > 20_000 and files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files.html.read_text().replace("\\u003c", "<").replace("\\u003e", ">").replace("\\u002f", "/")  # plotly escapes < > /
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000  # offline: plotly.js beside the page
    assert (page.count('"type":"scatter3d"') > 1) == (len(elements) == 4)  # the template names it once
    stable = {p.formula for p in pts if p.is_stable}
    for formula in stable:
        assert formula.replace("2", "<sub>2</sub>").replace("3", "<sub>3</sub>").replace("4", "<sub>4</sub>") in page
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_spread_labels_known_answers():
    # two equal boxes on top of each other: pushed apart vertically (least overlap), half each, pad 1
    shift = spread_labels(np.array([[0, 0, 10, 4], [0, 0, 10, 4]]), pad=1.0)
    assert shift == pytest.approx(np.array([[0, -2.5], [0, 2.5]]))
    # a tall narrow pair overlapping by 2 in x: pushed apart horizontally by 1 + pad/2 each
    assert spread_labels(np.array([[0, 0, 4, 20], [2, 0, 6, 20]]), pad=1.0) == pytest.approx(np.array([[-1.5, 0], [1.5, 0]]))
    # boxes apart stay put
    assert not spread_labels(np.array([[0, 0, 10, 4], [20, 0, 30, 4], [0, 10, 10, 14]])).any()
    # eight labels at one point end with no two overlapping
    boxes = np.tile([0.0, 0.0, 30.0, 8.0], (8, 1))
    moved = boxes + np.hstack([spread_labels(boxes, pad=1.0)] * 2)
    for i in range(8):
        for j in range(i + 1, 8):
            assert min(moved[i, 2], moved[j, 2]) <= max(moved[i, 0], moved[j, 0]) or \
                   min(moved[i, 3], moved[j, 3]) <= max(moved[i, 1], moved[j, 1])


def _dense_quaternary() -> list[HullEntry]:
    """Li-Fe-P-O with 22 stable phases (18 compounds), several of them close in composition (labels collide when not spread)."""
    refs = [HullEntry(el, el, e, kind=EntryKind.REFERENCE) for el, e in (("Li", -1.9), ("Fe", -8.3), ("P", -5.4), ("O", -4.9))]
    stable = [("Li2O", -4.8), ("Li2O2", -4.9), ("Fe2O3", -6.95), ("Fe3O4", -7.05), ("FeO", -7.25), ("FeP", -7.2), ("Fe2P", -7.6),
              ("Li3PO4", -5.9), ("LiFePO4", -6.7), ("Fe3(PO4)2", -6.75), ("Li3Fe2(PO4)3", -6.4), ("FePO4", -6.45),
              ("LiFeP2O7", -6.3), ("Fe2P2O7", -6.55), ("LiFeO2", -6.45), ("LiFe5O8", -6.95), ("Li5FeO4", -5.6), ("Li2FeO2", -6.05)]
    return refs + [HullEntry(f"s{k}", f, e) for k, (f, e) in enumerate(stable)]


def _label_overlaps(fig) -> tuple[int, int]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in ax.texts if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    return len(texts), sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_quaternary_labels_do_not_overlap():
    """The 3-D projection crowds labels (stop 12 saw them overlap); spread in display space, none overlaps."""
    import matplotlib.pyplot as plt

    pts = _points(_dense_quaternary())
    stable = {p.formula for p in pts if p.is_stable}
    assert len(stable) == 22
    plain = phase_diagram_figure(pts, ["Li", "Fe", "P", "O"], declutter=False)
    spread = phase_diagram_figure(pts, ["Li", "Fe", "P", "O"])
    try:
        n_plain, overlaps_plain = _label_overlaps(plain)
        n_spread, overlaps_spread = _label_overlaps(spread)
    finally:
        plt.close(plain)
        plt.close(spread)
    assert n_plain == n_spread == len(stable)
    assert overlaps_plain > 0  # the test case is dense enough to need it
    assert overlaps_spread == 0


def test_five_elements_not_drawn_but_said(tmp_path):
    files = plot_phase_diagram(_points([*quaternary_entries(), HullEntry("Na", "Na", -1.3, kind=EntryKind.REFERENCE)]),
                               ["Li", "Fe", "P", "O", "Na"], tmp_path / "pd.png", tmp_path / "pd.html")
    assert files.png is None and "5-element system is not drawn" in files.note


def _rows() -> tuple[list[PromisingRow], dict[str, Structure]]:
    s = Structure(Lattice.cubic(2.9), ["Al", "Ni"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    rows = [PromisingRow("c0ffee01", "AlNi", "Pm-3m", -0.62, 0.0, -0.05, True, "1.000 AlNi", -0.55, "aflow:AB_cP2_221_b_a", "c0ffee01-chgnet",
                         0.8123),
            PromisingRow("../evil<b>", "AlNi3", "Pm-3m", -0.40, 0.03, 0.03, False, "0.5 AlNi + 0.5 Ni", -0.41, "folder:x.cif", "m2")]
    return rows, {r.candidate_id: s for r in rows}


def test_promising_folder_has_cif_poscar_csv_json_and_nothing_stale(tmp_path):
    rows, structures = _rows()
    folder = write_promising(tmp_path / "promising", rows, structures)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["AlNi3_.._evil_b_.cif", "AlNi3_.._evil_b_.vasp", "AlNi_c0ffee01.cif", "AlNi_c0ffee01.vasp",
                     "summary.csv", "summary.json"]
    assert all(p.parent == folder for p in folder.iterdir())  # a '../' id cannot escape
    table = list(csv.DictReader((folder / "summary.csv").read_text().splitlines()))
    data = json.loads((folder / "summary.json").read_text())
    assert [r["candidate_id"] for r in table] == [r["candidate_id"] for r in data] == ["c0ffee01", "../evil<b>"]
    assert data[0]["e_above_known_hull"] == -0.05 and data[0]["spacegroup"] == "Pm-3m" and data[0]["template"] == "aflow:AB_cP2_221_b_a"
    assert data[0]["min_bond_ratio"] == 0.8123 and table[0]["min_bond_ratio"] == "0.8123" and data[1]["min_bond_ratio"] is None
    assert Structure.from_file(folder / data[0]["cif"]).composition.reduced_formula == "AlNi"
    write_promising(tmp_path / "promising", rows[:1], structures)  # a refresh with fewer rows
    assert sorted(p.name for p in folder.iterdir()) == ["AlNi_c0ffee01.cif", "AlNi_c0ffee01.vasp", "summary.csv", "summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["promising"]


def _report(tmp_path: Path) -> Path:
    rows, structures = _rows()
    write_promising(tmp_path / "promising", rows, structures)
    entries = [e for e in quaternary_entries() if "P" not in Composition(e.formula)]
    files = plot_phase_diagram(_points(entries), ["Li", "Fe", "O"], tmp_path / "phase_diagram.png", tmp_path / "phase_diagram.html",
                               title="Fe-Li-O test", max_e_above_hull=0.5)
    data = ReportData(campaign="test<script>", chemsys="Al-Ni", summary={"elements": "Al, Ni", "run type": "chgnet-x"},
                      counts={"candidates": {"analyzed": 2, "screened_out": 3}, "fireworks": {"COMPLETED": 9}},
                      rows=rows, plot_png=files.png.name, plot_html=files.html.name)
    return write_report(tmp_path, data)


def test_report_page_content_and_escaping(tmp_path):
    page = _report(tmp_path).read_text()
    assert "<script>" not in page.split("<body>")[1]  # names are escaped
    assert "test&lt;script&gt;" in page
    assert len(re.findall(r"<tr class=\"stable\">", page)) == 1
    assert 'href="promising/AlNi_c0ffee01.cif"' in page
    assert "start bond / radii" in page and '<td class="num">0.812</td>' in page  # the generated cell's shortest bond
    assert "phase_diagram.png" in page and "phase_diagram.html" in page
    empty = render_report(ReportData(campaign="c", chemsys="A-B", summary={}, counts={}))
    assert "none yet" in empty and "no plot: no hull yet" in empty


def chromium_check(report: Path, tmp_path: Path) -> None:
    """Open the page in headless Chromium: the screenshot is not blank, the tables have rows, the plot renders."""
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
            "--virtual-time-budget=8000"]
    subprocess.run([*args, "--window-size=1280,2000", f"--screenshot={shot}", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = imread(shot)[..., :3]
    assert img.shape[0] >= 1000
    non_white = float((img.mean(axis=2) < 0.95).mean())
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert non_white > 0.03 and colours > 200, (non_white, colours)  # text, tables and the plot drew
    dom = subprocess.run([*args, "--dump-dom", report.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    body = dom.split("<tbody>")
    assert len(body) > 2 and all("<tr" in b for b in body[1:])
    # the interactive plot: plotly (loaded from the file beside it, no network) drew its SVG
    plot_dom = subprocess.run([*args, "--dump-dom", (report.parent / "phase_diagram.html").as_uri()],
                              check=True, capture_output=True, text=True, timeout=120).stdout
    assert "main-svg" in plot_dom and "scatterlayer" in plot_dom


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    chromium_check(_report(tmp_path), tmp_path)


def test_funnel_report_figures_known_answers(tmp_path):
    from amdflow.report.funnel import ParityPoint, funnel_stages, hit_rate, mae, parity_png

    pts = [ParityPoint("a", "AlNi", 0.0, -0.7, 0.0, -0.57), ParityPoint("b", "Al3Ni", 0.02, -0.35, 0.13, -0.36),
           ParityPoint("c", "AlNi3", 0.2, -0.47, None, -0.40)]
    assert hit_rate(pts, 0.05) == pytest.approx(2 / 3) and hit_rate([], 0.05) is None
    assert mae([(0.0, 0.0), (0.13, 0.02)]) == pytest.approx(0.055)
    counts = {"screened_out": 2, "duplicate": 4, "funnel_cut": 1, "analyzed": 3}
    stages = funnel_stages(counts, {"relaxed": 5, "passed": 3, "relaxed_duplicates": 1})
    assert stages == [("generated", 10), ("passed the CGCNN screen", 8), ("kept by dedup", 5),
                      ("relaxed by the funnel's potential", 5), ("passed the funnel's cut (not a relaxed duplicate)", 3),
                      ("relaxed by the final engine", 3)]
    assert funnel_stages({"analyzed": 2, "duplicate": 1}, None)[-1] == ("relaxed by the final engine", 2)
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's own backend (a notebook's inline one): drawing the PNG must leave it
    try:
        path = parity_png(pts, tmp_path / "parity.png", "chgnet-0.4.2", "sevennet-7net-0-0.13.0", 0.05)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert parity_png([], tmp_path / "none.png", "x", None, 0.05) is None and not (tmp_path / "none.png").exists()
