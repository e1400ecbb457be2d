"""Phase-diagram plot (PNG) with pymatgen's PDPlotter on the matplotlib backend."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from amdflow.thermo.hull import HullEntry


def plot_phase_diagram(entries: list[HullEntry], path: Path, title: str = "", show_unstable: float = 0.2) -> Path:
    """Write a PNG of the hull over ``entries`` (unstable ones up to ``show_unstable`` eV/atom)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from pymatgen.analysis.phase_diagram import PDPlotter, PhaseDiagram

    pd = PhaseDiagram([e.to_computed_entry() for e in entries])
    plotter = PDPlotter(pd, backend="matplotlib", show_unstable=show_unstable)
    # PDPlotter fixes an equal aspect ratio, and matplotlib logs a harmless warning about it
    # on every plot; keep that one logger quiet while we plot.
    mpl_logger = logging.getLogger("matplotlib.axes._base")
    previous = mpl_logger.level
    mpl_logger.setLevel(logging.ERROR)
    try:
        ax = plotter.get_plot()
    finally:
        mpl_logger.setLevel(previous)
    fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
    if title:
        fig.suptitle(title, y=1.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
