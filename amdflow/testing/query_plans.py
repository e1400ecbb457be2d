"""Which of the reads a piece of code sends to MongoDB would scan a whole collection: ``explain`` on each.

Used by the tests (``amdflow status`` and ``amdflow report`` use an index for every query)
and by ``scripts/bench_campaign.py`` (the same check at 100k candidates). Reads are
recorded with pymongo's command monitoring while the code runs, then explained one by
one (``queryPlanner`` verbosity: planned, not run); a plan with a ``COLLSCAN`` stage is
reported with its command.

Only clients created after :func:`record_reads` starts are seen (pymongo attaches global
listeners at client creation), so open the database inside the block.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

READ_COMMANDS = ("find", "aggregate", "count", "distinct")
# FireWorks' id counter holds one document: a scan of it costs nothing (amdflow counts it to see an empty LaunchPad)
ONE_DOCUMENT_COLLECTIONS = {"fw_id_assigner"}
_SESSION_FIELDS = {"lsid", "$db", "$clusterTime", "$readPreference", "txnNumber", "readConcern", "batchSize", "getMore",
                   "singleBatch"}


@dataclass
class _Recorder:
    database: str | None = None
    active: bool = False
    commands: list[dict[str, Any]] = field(default_factory=list)

    def started(self, event: Any) -> None:
        if self.active and event.command_name in READ_COMMANDS and (self.database is None or event.database_name == self.database):
            cmd = {k: v for k, v in dict(event.command).items() if k not in _SESSION_FIELDS}
            self.commands.append({"db": event.database_name, "command": cmd})

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass


_RECORDER = _Recorder()
_REGISTERED = False


@contextlib.contextmanager
def record_reads(database: str | None = None) -> Iterator[list[dict[str, Any]]]:
    """Record every read command sent to ``database`` (any, if None) by clients created inside the block."""
    global _REGISTERED
    from pymongo import monitoring

    if not _REGISTERED:  # pymongo cannot unregister a global listener: one recorder, switched on and off
        listener = type("AmdflowReadRecorder", (monitoring.CommandListener,), {
            "started": lambda self, e: _RECORDER.started(e), "succeeded": lambda self, e: None,
            "failed": lambda self, e: None})()
        monitoring.register(listener)
        _REGISTERED = True
    _RECORDER.database, _RECORDER.active, _RECORDER.commands = database, True, []
    try:
        yield _RECORDER.commands
    finally:
        _RECORDER.active = False


def collection_scans(client: Any, reads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded reads whose planned winning plan scans a collection (``COLLSCAN``), each once."""
    seen: set[str] = set()
    scans = []
    for read in reads:
        cmd = dict(read["command"])
        if next(iter(cmd.values())) in ONE_DOCUMENT_COLLECTIONS:
            continue
        if "aggregate" in cmd:
            cmd.setdefault("cursor", {})
        key = json.dumps(cmd, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        plan = client[read["db"]].command({"explain": cmd, "verbosity": "queryPlanner"})
        if "COLLSCAN" in json.dumps(plan, default=str):
            scans.append({"db": read["db"], "command": cmd})
    return scans
