"""Relaxation engines behind one interface (``relax(structure, directory) -> RelaxResult``)."""

from amdflow.relax.base import RelaxResult, get_engine, get_funnel_engine, relax_many

__all__ = ["RelaxResult", "get_engine", "get_funnel_engine", "relax_many"]
