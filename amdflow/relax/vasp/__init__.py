"""VASP through Custodian: inputs from pymatgen input sets, Custodian jobs and handlers, task documents."""

from amdflow.relax.vasp.inputs import (
           input_set,
           settings_differences,
           settings_fingerprint,
           write_inputs,
)
from amdflow.relax.vasp.parse import parse_vasp_dir
from amdflow.relax.vasp.run import HANDLER_GROUPS, build_handlers, build_jobs, run_custodian

__all__ = ["HANDLER_GROUPS", "build_handlers", "build_jobs", "input_set", "parse_vasp_dir", "run_custodian",
           "settings_differences", "settings_fingerprint", "write_inputs"]
