"""Phase-diagram plots: PNG (matplotlib) and interactive HTML (plotly), binary to quaternary.

The hull is rebuilt from the stable phases' formation energies (pymatgen PhaseDiagram; its
facets give the tie lines). Compositions are drawn in the usual Gibbs simplex: binary as
formation energy against composition, ternary in a triangle, quaternary in a tetrahedron.
Stable phases are black and labelled; candidates are coloured by energy above the hull
(stable candidates: red stars, labelled); other known or reference phases above the hull
are grey. Systems of five or more elements are not drawn (each quaternary subsystem can be).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition

MAX_PLOT_ELEMENTS = 4
STABLE_TOL = 1e-8


@dataclass(frozen=True)
class PlotPoint:
    """One phase to draw (energies eV/atom)."""

    material_id: str
    formula: str
    formation_energy_per_atom: float
    e_above_hull: float
    is_stable: bool
    kind: str = "candidate"  # candidate | reference | known

    @classmethod
    def from_thermo(cls, doc: dict) -> PlotPoint:
        return cls(doc["material_id"], doc["formula"], float(doc["formation_energy_per_atom"]), float(doc["e_above_hull"]),
                   bool(doc["is_stable"]), doc.get("kind", "candidate"))


@dataclass(frozen=True)
class PlotFiles:
    png: Path | None
    html: Path | None
    note: str = ""


def simplex_coords(formula: str, elements: list[str]) -> np.ndarray:
    """Cartesian position of a composition in the Gibbs simplex of ``elements`` (2 to 4)."""
    comp = Composition(formula).fractional_composition
    x = np.array([comp[el] for el in elements], dtype=float)
    n = len(elements)
    if n == 2:
        return np.array([x[1]])
    if n == 3:
        corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    elif n == 4:
        corners = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0],
                            [0.5, math.sqrt(3) / 6, math.sqrt(2.0 / 3.0)]])
    else:
        raise ValueError(f"cannot draw a {n}-element system")
    return x @ corners


def hull_edges(points: list[PlotPoint], elements: list[str]) -> list[tuple[PlotPoint, PlotPoint]]:
    """Tie lines: the edges of the hull facets among the stable phases."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    stable = [p for p in points if p.is_stable]
    entries = []
    for p in stable:
        comp = Composition(p.formula)
        entries.append(PDEntry(comp, p.formation_energy_per_atom * comp.num_atoms, name=p.material_id))
    pd = PhaseDiagram(entries)
    by_name = {p.material_id: p for p in stable}
    edges = set()
    for facet in pd.facets:
        for i, j in itertools.combinations(facet, 2):
            a, b = pd.qhull_entries[i], pd.qhull_entries[j]
            if a in pd.stable_entries and b in pd.stable_entries:
                edges.add(tuple(sorted((a.name, b.name))))
    return [(by_name[a], by_name[b]) for a, b in sorted(edges) if a in by_name and b in by_name]


def _coords(p: PlotPoint, elements: list[str]) -> np.ndarray:
    c = simplex_coords(p.formula, elements)
    return np.array([c[0], p.formation_energy_per_atom]) if len(elements) == 2 else c


def _atomic_write(path: Path, write: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)  # type: ignore[operator]
        os.replace(tmp, path)
    except OSError as err:
        from amdflow.report.export import output_error

        raise output_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _select(points: Iterable[PlotPoint], max_e_above_hull: float) -> tuple[list[PlotPoint], int]:
    points = list(points)
    shown = [p for p in points if p.is_stable or p.e_above_hull <= max_e_above_hull]
    return shown, len(points) - len(shown)


def _push(a: np.ndarray, b: np.ndarray, pad: float) -> np.ndarray | None:
    """How far box ``b`` must move (a vector) to stop overlapping box ``a``, along the axis of least overlap; None if apart."""
    ox = min(a[2], b[2]) - max(a[0], b[0]) + pad
    oy = min(a[3], b[3]) - max(a[1], b[1]) + pad
    if ox <= 0 or oy <= 0:
        return None
    axis, amount = (1, oy) if oy <= ox else (0, ox)
    sign = 1.0 if (b[axis] + b[axis + 2]) >= (a[axis] + a[axis + 2]) else -1.0
    out = np.zeros(2)
    out[axis] = sign * amount
    return out


def spread_labels(boxes: np.ndarray, pad: float = 1.0, iterations: int = 300, obstacles: np.ndarray | None = None) -> np.ndarray:
    """Shifts (n, 2) that move label boxes apart, and off fixed ``obstacles``, until nothing overlaps.

    Boxes are rows ``x0, y0, x1, y1`` in display units. Each overlapping pair of labels is
    pushed apart, half each, along the axis where it overlaps least (for text, mostly
    vertically), so labels move as little as possible; a label on an obstacle (a marker)
    moves off it alone. Boxes that overlap nothing stay put. Stops after ``iterations``
    passes. Deterministic: a tie (same centre) pushes the later box up, or right.
    """
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    fixed = np.zeros((0, 4)) if obstacles is None else np.asarray(obstacles, dtype=float).reshape(-1, 4)
    shift = np.zeros((len(b), 2))
    for _ in range(iterations):
        cur = b + np.hstack([shift, shift])
        moved = False
        for i in range(len(cur)):
            for j in range(i + 1, len(cur)):
                step = _push(cur[i], cur[j], pad)
                if step is not None:
                    half = np.hstack([step, step]) / 2
                    shift[i] -= step / 2
                    shift[j] += step / 2
                    cur[i] -= half
                    cur[j] += half
                    moved = True
            for f in fixed:
                step = _push(f, cur[i], pad)
                if step is not None:
                    shift[i] += step
                    cur[i] += np.hstack([step, step])
                    moved = True
        if not moved:
            break
    return shift


def _place_labels(fig: Any, ax: Any, anchors: np.ndarray, offsets_px: np.ndarray, texts: list[str], declutter: bool = True,
                  marker_px: float = 0.0, **kw: Any) -> list[Any]:
    """Labels at ``anchors`` (2-D data coordinates; for a 3-D axes the projected ones) moved by
    ``offsets_px`` and then by ``spread_labels`` so that none overlaps another or a marker
    (``marker_px``: the markers' half-size at each anchor)."""
    renderer = fig.canvas.get_renderer()
    disp = ax.transData.transform(anchors) + offsets_px
    inv = ax.transData.inverted()
    labels = [ax.text(*inv.transform(d), t, ha="center", va="center", clip_on=False, **kw) if not hasattr(ax, "text2D")
              else ax.text2D(*inv.transform(d), t, transform=ax.transData, ha="center", va="center", clip_on=False, **kw)
              for d, t in zip(disp, texts, strict=True)]
    if not (labels and declutter):
        return labels
    boxes = np.array([lab.get_window_extent(renderer).extents for lab in labels])
    centres = ax.transData.transform(anchors)
    markers = np.hstack([centres - marker_px, centres + marker_px]) if marker_px > 0 else None
    for lab, d, s in zip(labels, disp, spread_labels(boxes, pad=1.0, obstacles=markers), strict=True):
        lab.set_position(inv.transform(d + s))
    return labels


def _label_stable(fig: Any, ax: Any, points: list[PlotPoint], elements: list[str], centre: np.ndarray | None,
                  declutter: bool = True) -> None:
    """Label the stable phases, each beside its point and away from the hull's centre, none overlapping."""
    from pymatgen.util.string import latexify

    if not points:
        return
    n = len(elements)
    fig.canvas.draw()  # limits, aspect and (3-D) projection are final only after a draw
    xyz = np.array([_coords(p, elements) for p in points])
    if n == 2:
        anchors = xyz
        offsets = np.tile([0.0, -12.0 * fig.dpi / 72.0], (len(points), 1))
    else:
        if n == 4:
            from mpl_toolkits.mplot3d import proj3d

            xs, ys, _ = proj3d.proj_transform(*xyz.T, ax.M)
            anchors = np.c_[xs, ys]
            c2 = np.array(proj3d.proj_transform(*centre, ax.M)[:2])
        else:
            anchors, c2 = xyz, centre
        disp, dc = ax.transData.transform(anchors), ax.transData.transform(c2[None, :])[0]
        d = disp - dc
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        unit = np.where(norm > 1e-9, d / np.maximum(norm, 1e-9), np.array([0.0, 1.0]))
        offsets = unit * 12.0 * fig.dpi / 72.0
    # the largest stable marker (the star, s=140 pt^2) is about 6 pt across its middle
    _place_labels(fig, ax, anchors, offsets, [latexify(p.formula) for p in points], declutter, marker_px=5.0 * fig.dpi / 72.0,
                  fontsize=8 if n < 4 else 7)


def phase_diagram_figure(points: list[PlotPoint], elements: list[str], title: str = "", max_e_above_hull: float = 0.3,
                         declutter: bool = True) -> Any:
    """The matplotlib Figure of the phase diagram (2-4 elements); the caller closes it.

    Stable phases are labelled; with ``declutter`` the labels are moved apart so that none
    overlaps another (``spread_labels``), else each sits at its fixed offset.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure of its own Agg canvas, not pyplot's: whatever backend the caller uses (a notebook's inline one) stays.
    elements = sorted(elements)
    n = len(elements)
    shown, hidden = _select(points, max_e_above_hull)
    edges = hull_edges(shown, elements)
    cmap = matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=max(max_e_above_hull, 1e-3))
    three_d = n == 4
    fig = Figure(figsize=(7.5, 6.5))
    FigureCanvasAgg(fig)
    if three_d:
        import mpl_toolkits.mplot3d  # noqa: F401 - registers the 3d projection
    ax = fig.add_subplot(projection="3d") if three_d else fig.add_subplot()
    for a, b in edges:
        xy = np.array([_coords(a, elements), _coords(b, elements)])
        ax.plot(*xy.T, color="black", lw=1.0, zorder=1)
    if n == 3:
        corners = np.array([simplex_coords(el, elements) for el in [*elements, elements[0]]])
        ax.plot(*corners.T, color="black", lw=1.0)
    unstable_other = [p for p in shown if not p.is_stable and p.kind != "candidate"]
    cands = [p for p in shown if p.kind == "candidate" and not p.is_stable]
    if unstable_other:
        xy = np.array([_coords(p, elements) for p in unstable_other])
        ax.scatter(*xy.T, s=18, facecolors="none", edgecolors="grey", label="known / reference, above hull", zorder=2)
    if cands:
        xy = np.array([_coords(p, elements) for p in cands])
        sc = ax.scatter(*xy.T, s=34, c=[p.e_above_hull for p in cands], cmap=cmap, norm=norm, edgecolors="black",
                        linewidths=0.3, label="candidate, above hull", zorder=3)
        fig.colorbar(sc, ax=ax, shrink=0.7, label="E above hull (eV/atom)")
    stable = [p for p in shown if p.is_stable]
    centre = np.mean([_coords(p, elements) for p in stable], axis=0) if stable else None
    for kind, marker, color, size, label in (("other", "o", "black", 30, "stable"), ("candidate", "*", "red", 140, "stable candidate (new)")):
        group = [p for p in stable if (p.kind == "candidate") == (kind == "candidate")]
        if not group:
            continue
        xy = np.array([_coords(p, elements) for p in group])
        ax.scatter(*xy.T, s=size, marker=marker, color=color, edgecolors="black", linewidths=0.4, label=label, zorder=4)
    label_points: dict[str, PlotPoint] = {}
    for p in stable:
        label_points.setdefault(p.formula, p)
    if n == 2:
        ax.set_xlabel(f"x in {elements[0]}$_{{1-x}}${elements[1]}$_x$")
        ax.set_ylabel("formation energy (eV/atom)")
        ax.axhline(0.0, color="grey", lw=0.5)
    elif n == 3:
        ax.set_aspect("equal")
        ax.axis("off")
    else:
        ax.set_axis_off()
        ax.view_init(elev=18, azim=-62)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 if n == 2 else 0.0), ncol=2, fontsize=7, frameon=False)
    note = f"; {hidden} above {max_e_above_hull} eV/atom not shown" if hidden else ""
    ax.set_title(f"{title}{note}", fontsize=9)
    _label_stable(fig, ax, list(label_points.values()), elements, centre, declutter)
    return fig


def plot_png(points: list[PlotPoint], elements: list[str], path: Path, title: str = "", max_e_above_hull: float = 0.3) -> Path:
    """Write a PNG of the phase diagram (atomically)."""
    fig = phase_diagram_figure(points, elements, title, max_e_above_hull)

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")

    mpl_logger = logging.getLogger("matplotlib")
    previous = mpl_logger.level
    mpl_logger.setLevel(logging.ERROR)
    try:
        return _atomic_write(path, save)
    finally:
        mpl_logger.setLevel(previous)


def plot_html(points: list[PlotPoint], elements: list[str], path: Path, title: str = "", max_e_above_hull: float = 0.3) -> Path:
    """Write an interactive plotly page (hover: formula, id, kind, energies); plotly.js lies beside it."""
    import plotly.graph_objects as go
    from pymatgen.util.string import htmlify

    elements = sorted(elements)
    n = len(elements)
    shown, hidden = _select(points, max_e_above_hull)
    edges = hull_edges(shown, elements)
    three_d = n == 4
    scatter = go.Scatter3d if three_d else go.Scatter
    axes = ("x", "y", "z") if three_d else ("x", "y")

    def xyz(group: list[PlotPoint]) -> dict:
        arr = np.array([_coords(p, elements) for p in group]) if group else np.zeros((0, len(axes)))
        return {a: arr[:, i].tolist() for i, a in enumerate(axes)}

    def hover(group: list[PlotPoint]) -> list[str]:
        return [f"{htmlify(p.formula)}<br>{p.material_id}<br>{p.kind}<br>E_f {p.formation_energy_per_atom:.3f} eV/atom"
                f"<br>E above hull {p.e_above_hull:.3f} eV/atom" for p in group]

    fig = go.Figure()
    line_xyz: dict[str, list] = {a: [] for a in axes}
    for a, b in edges:
        for p in (a, b):
            for i, ax_name in enumerate(axes):
                line_xyz[ax_name].append(float(_coords(p, elements)[i]))
        for ax_name in axes:
            line_xyz[ax_name].append(None)
    if n == 3:
        for el in [*elements, elements[0]]:
            c = simplex_coords(el, elements)
            line_xyz["x"].append(float(c[0]))
            line_xyz["y"].append(float(c[1]))
    fig.add_trace(scatter(**line_xyz, mode="lines", line={"color": "black", "width": 2}, name="hull", hoverinfo="skip"))
    other = [p for p in shown if not p.is_stable and p.kind != "candidate"]
    cands = [p for p in shown if not p.is_stable and p.kind == "candidate"]
    stable = [p for p in shown if p.is_stable and p.kind != "candidate"]
    new = [p for p in shown if p.is_stable and p.kind == "candidate"]
    fig.add_trace(scatter(**xyz(other), mode="markers", name="known / reference, above hull", text=hover(other), hoverinfo="text",
                          marker={"color": "white", "line": {"color": "grey", "width": 1}, "size": 6}))
    fig.add_trace(scatter(**xyz(cands), mode="markers", name="candidate, above hull", text=hover(cands), hoverinfo="text",
                          marker={"color": [p.e_above_hull for p in cands], "colorscale": "Viridis", "cmin": 0.0,
                                  "cmax": max(max_e_above_hull, 1e-3), "size": 7, "showscale": True,
                                  "colorbar": {"title": {"text": "E above hull (eV/atom)"}}}))
    fig.add_trace(scatter(**xyz(stable), mode="markers+text", name="stable", text=[htmlify(p.formula) for p in stable],
                          textposition="top center", hovertext=hover(stable), hoverinfo="text",
                          marker={"color": "black", "size": 7}))
    fig.add_trace(scatter(**xyz(new), mode="markers+text", name="stable candidate (new)", text=[htmlify(p.formula) for p in new],
                          textposition="bottom center", hovertext=hover(new), hoverinfo="text",
                          marker={"color": "red", "size": 10, "symbol": "diamond" if three_d else "star"}))
    note = f"; {hidden} above {max_e_above_hull} eV/atom not shown" if hidden else ""
    layout: dict = {"title": {"text": f"{title}{note}"}, "template": "plotly_white", "height": 700,
                    "legend": {"orientation": "h", "yanchor": "top", "y": -0.05, "xanchor": "center", "x": 0.5}}
    if n == 2:
        layout.update(xaxis={"title": {"text": f"x in {elements[0]}(1-x){elements[1]}(x)"}}, yaxis={"title": {"text": "formation energy (eV/atom)"}})
    elif n == 3:
        layout.update(xaxis={"visible": False}, yaxis={"visible": False, "scaleanchor": "x"})
        for el in elements:
            c = simplex_coords(el, elements)
            fig.add_annotation(x=float(c[0]), y=float(c[1]), text=f"<b>{el}</b>", showarrow=False, yshift=-14 if c[1] < 0.1 else 14)
    else:
        blank = {"visible": False}
        layout.update(scene={"xaxis": blank, "yaxis": blank, "zaxis": blank, "aspectmode": "data"})
    fig.update_layout(**layout)

    def save(tmp: Path) -> None:
        # plotly.min.js is written once beside the page: it opens offline (no CDN on a cluster)
        fig.write_html(tmp, include_plotlyjs="directory", full_html=True)

    return _atomic_write(path, save)


def plot_phase_diagram(points: list[PlotPoint], elements: list[str], png: Path | None, html: Path | None,
                       title: str = "", max_e_above_hull: float = 0.3) -> PlotFiles:
    """Both plots of one system; systems of more than four elements are not drawn (the note says so)."""
    if not 2 <= len(elements) <= MAX_PLOT_ELEMENTS:
        return PlotFiles(None, None, f"{'-'.join(sorted(elements))}: a {len(elements)}-element system is not drawn "
                                     "(phase diagrams are drawn for 2 to 4 elements)")
    if not any(p.is_stable for p in points):
        return PlotFiles(None, None, "no hull yet")
    out_png = plot_png(points, elements, png, title, max_e_above_hull) if png else None
    out_html = plot_html(points, elements, html, title, max_e_above_hull) if html else None
    return PlotFiles(out_png, out_html)
