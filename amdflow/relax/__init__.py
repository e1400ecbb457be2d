"""Relaxation engines behind one interface (``relax(structure, directory) -> RelaxResult``)."""

from amdflow.relax.base import RelaxResult, get_engine

__all__ = ["RelaxResult", "get_engine"]
