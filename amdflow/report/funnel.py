"""Did the funnel serve this chemical system? Counts at each cut, parity plots and the hit rate.

For every candidate that reached the final relax: its ML energy above the ML hull (the
funnel's potential) against its final energy above the final hull, and its CGCNN
formation energy against the final one. The hit rate is the fraction of final
relaxations that landed within ``promising_e_above_hull``: what the DFT hours bought.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PARITY_FILE = "funnel_parity.png"


@dataclass(frozen=True)
class ParityPoint:
    """One candidate relaxed by the final engine (energies eV/atom; None: not known)."""

    candidate_id: str
    formula: str
    final_e_above_hull: float
    final_formation_energy_per_atom: float
    ml_e_above_hull: float | None = None
    predicted_formation_energy_per_atom: float | None = None


def hit_rate(points: Sequence[ParityPoint], threshold: float) -> float | None:
    """Fraction of final relaxations at most ``threshold`` above the final hull (None without any)."""
    if not points:
        return None
    return sum(p.final_e_above_hull <= threshold + 1e-9 for p in points) / len(points)


def mae(pairs: Sequence[tuple[float, float]]) -> float | None:
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else None


def funnel_stages(counts: dict[str, int], funnel: dict[str, int] | None) -> list[tuple[str, int]]:
    """(stage, candidates that reached it) from the candidate state counts and the funnel's counts."""
    total = sum(counts.values())
    after_screen = total - counts.get("screened_out", 0) - counts.get("generated", 0)
    relaxed = counts.get("relaxed", 0) + counts.get("analyzed", 0)
    funnel_dups = (funnel or {}).get("relaxed_duplicates", 0)
    rows = [("generated", total), ("passed the CGCNN screen", after_screen),
            ("kept by dedup", after_screen - (counts.get("duplicate", 0) - funnel_dups))]
    if funnel:
        rows += [("relaxed by the funnel's potential", funnel["relaxed"]),
                 ("passed the funnel's cut (not a relaxed duplicate)", funnel["passed"])]
        if funnel.get("ml_failed"):  # the potential's guard tripped: passed on unranked, never dropped
            rows.append(("of which passed on unranked (ML relaxation failed)", funnel["ml_failed"]))
    rows.append(("relaxed by the final engine", relaxed))
    return rows


def parity_png(points: Sequence[ParityPoint], path: Path, final_label: str, ml_label: str | None,
               threshold: float) -> Path | None:
    """Two panels: ML vs final E above hull, CGCNN vs final E_f (atomically written); None without points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from amdflow.report.plot import _atomic_write

    if not points:
        return None
    panels = []
    if ml_label:
        ml = [(p.ml_e_above_hull, p.final_e_above_hull) for p in points if p.ml_e_above_hull is not None]
        panels.append((ml, f"E above hull, ML ({ml_label})", f"E above hull, final ({final_label})", threshold))
    cg = [(p.predicted_formation_energy_per_atom, p.final_formation_energy_per_atom) for p in points
          if p.predicted_formation_energy_per_atom is not None]
    panels.append((cg, "E_f predicted (CGCNN)", f"E_f, final ({final_label})", None))
    # A Figure of its own Agg canvas, not pyplot's: the caller's backend (a notebook's inline one) stays as it was.
    fig = Figure(figsize=(5.2 * len(panels), 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (pairs, xlabel, ylabel, cut) in zip(axes[0], panels, strict=True):
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#888", lw=1, zorder=1)
            ax.scatter(xs, ys, s=22, color="#1f77b4", zorder=2)
            if cut is not None:
                ax.axhline(cut, color="#c00", lw=0.8, ls="--", zorder=1)
            err = mae(pairs)
            ax.set_title(f"n = {len(pairs)}, MAE {err:.3f} eV/atom" if err is not None and math.isfinite(err) else f"n = {len(pairs)}",
                         fontsize=10)
        ax.set_xlabel(f"{xlabel} (eV/atom)", fontsize=9)
        ax.set_ylabel(f"{ylabel} (eV/atom)", fontsize=9)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=130, format="png")

    mpl = logging.getLogger("matplotlib")
    previous = mpl.level
    mpl.setLevel(logging.ERROR)
    try:
        return _atomic_write(Path(path), save)
    finally:
        mpl.setLevel(previous)
