"""Outputs for people: promising-candidate folder, phase-diagram plot, summaries."""

from amdflow.report.export import PromisingRow, write_promising
from amdflow.report.plot import plot_phase_diagram

__all__ = ["PromisingRow", "plot_phase_diagram", "write_promising"]
