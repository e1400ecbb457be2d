"""Custodian around VASP: job sequences by name, handler groups by name, validators.

exa-AMD ran VASP once and never retried. Here Custodian runs the job sequence of
:class:`~amdflow.campaign.VaspJobType` (double relaxation then a static run by default),
watches it with the handlers of the named groups, applies their corrections and retries
up to ``max_errors`` times, and checks the result with validators. The VASP command
comes from the FWorker's env (``vasp_cmd``), never from the campaign file.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amdflow.campaign import VaspConfig, VaspJobType

#: Handler groups by name. ``default``: the standard VASP error handlers (what atomate runs).
HANDLER_GROUPS: dict[str, tuple[str, ...]] = {
    "default": ("VaspErrorHandler", "MeshSymmetryErrorHandler", "UnconvergedErrorHandler", "NonConvergingErrorHandler",
                "PotimErrorHandler", "PositiveEnergyErrorHandler", "FrozenJobErrorHandler", "StdErrHandler",
                "LargeSigmaHandler", "IncorrectSmearingHandler"),
    "minimal": ("VaspErrorHandler", "UnconvergedErrorHandler"),
    "walltime": ("WalltimeHandler",),  # stops VASP cleanly before the queue's walltime (PBS_WALLTIME / SLURM)
    "scan": ("ScanMetalHandler", "KspacingMetalHandler"),
}
#: The static run after a double relaxation (MP's static choices; EDIFFG is ignored when NSW = 0).
STATIC_OVERRIDES = {"NSW": 0, "IBRION": -1, "ISIF": 2, "ISMEAR": -5, "LCHARG": True}


def known_handler_names() -> set[str]:
    """Group names and the handler class names they may name."""
    return set(HANDLER_GROUPS) | {h for group in HANDLER_GROUPS.values() for h in group}


def build_handlers(names: Sequence[str], output_file: str = "vasp.out") -> list[Any]:
    """Handler instances for groups and/or handler names (each handler once, in order)."""
    from custodian.vasp import handlers as vh

    chosen: list[str] = []
    for name in names:
        for h in HANDLER_GROUPS.get(name, (name,)):
            if h not in chosen:
                chosen.append(h)
    out = []
    for h in chosen:
        cls = getattr(vh, h, None)
        if cls is None:
            raise ValueError(f"unknown Custodian handler {h!r}")
        if h == "VaspErrorHandler" or h == "FrozenJobErrorHandler":
            out.append(cls(output_filename=output_file))
        elif h == "StdErrHandler":
            out.append(cls(output_filename="std_err.txt"))
        else:
            out.append(cls())
    return out


def build_validators() -> list[Any]:
    """A run is good only with a parseable vasprun.xml and the output files present."""
    from custodian.vasp.validators import VaspFilesValidator, VasprunXMLValidator

    return [VasprunXMLValidator(), VaspFilesValidator()]


def build_jobs(job_type: VaspJobType, vasp_cmd: str | Sequence[str], output_file: str = "vasp.out") -> list[Any]:
    """Custodian VaspJobs for one relaxation, run in one folder with suffixes (.relax1, .relax2, .static)."""
    from custodian.vasp.jobs import VaspJob

    cmd = shlex.split(vasp_cmd) if isinstance(vasp_cmd, str) else list(vasp_cmd)
    job_type = VaspJobType(job_type)
    if job_type is VaspJobType.STATIC:
        return [VaspJob(cmd, output_file=output_file, suffix="", final=True)]
    if job_type is VaspJobType.RELAX:
        return [VaspJob(cmd, output_file=output_file, suffix="", final=True)]
    jobs = list(VaspJob.double_relaxation_run(cmd, auto_npar=False))
    for job in jobs:
        job.output_file = output_file
    if job_type is VaspJobType.DOUBLE_RELAX_STATIC:
        jobs[-1].final = False
        jobs.append(VaspJob(cmd, output_file=output_file, suffix=".static", final=True, settings_override=[
            {"file": "CONTCAR", "action": {"_file_copy": {"dest": "POSCAR"}}},
            {"dict": "INCAR", "action": {"_set": dict(STATIC_OVERRIDES)}},
        ]))
    return jobs


def run_custodian(directory: Path, cfg: VaspConfig, vasp_cmd: str | Sequence[str], scratch_dir: str | None = None,
                  poll_s: float = 10.0) -> list[dict[str, Any]]:
    """Run the campaign's job sequence in ``directory`` under Custodian; returns Custodian's run log.

    Raises custodian's errors (``MaxCorrectionsError``, ``NonRecoverableError``,
    ``ValidationError``) when the run cannot be saved: the Firework then fizzles with it.
    """
    from custodian import Custodian

    c = Custodian(build_handlers(cfg.handlers), build_jobs(cfg.job, vasp_cmd), build_validators(), max_errors=cfg.max_errors,
                  scratch_dir=scratch_dir, gzipped_output=False, checkpoint=False, directory=str(directory),
                  polling_time_step=poll_s, monitor_freq=max(1, int(30 / poll_s)))  # monitors about every 30 s
    return list(c.run())
