"""Outputs for people: promising-candidate folder, phase-diagram plots, the HTML report."""

from amdflow.report.export import PromisingRow, write_promising
from amdflow.report.plot import PlotFiles, PlotPoint, plot_phase_diagram

__all__ = ["PlotFiles", "PlotPoint", "PromisingRow", "plot_phase_diagram", "write_promising"]
