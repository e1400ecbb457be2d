"""maggma builders (thin shells around :mod:`amdflow.thermo`)."""

from amdflow.builders.thermo import ThermoBuilder, run_builder

__all__ = ["ThermoBuilder", "run_builder"]
