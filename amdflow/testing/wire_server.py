"""Start the secantusdb MongoDB-wire server with one patch, for multi-process tests.

secantusdb 0.7.0b3 (GPL-2.0, used only as a separate test process) answers concurrent
``findAndModify`` commands on the same document without isolation: two FireWorks
rockets can check out the same Firework (measured: 199 launch docs for 200 Fireworks;
see ../shared/design/database.md). MongoDB makes findAndModify atomic per document; we
restore that here by serializing the server's findAndModify handler with one lock.
Nothing else is changed. Run: ``python -m amdflow.testing.wire_server --port N``.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

PINNED_VERSION = "0.7.0b3"
_LOCK = threading.Lock()


def patch_find_and_modify() -> None:
    """Serialize findAndModify (idempotent)."""
    from secantus import commands

    handler = commands._HANDLERS["findandmodify"]
    if getattr(handler, "_amdflow_serialized", False):
        return

    @functools.wraps(handler)
    def serialized(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return handler(*args, **kwargs)

    serialized._amdflow_serialized = True  # type: ignore[attr-defined]
    # The command is registered under both spellings; drivers send "findAndModify".
    for name in [k for k, v in commands._HANDLERS.items() if v is handler]:
        commands._HANDLERS[name] = serialized


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    found = version("secantusdb")
    if found != PINNED_VERSION:
        print(f"wire_server: secantusdb {found} found, {PINNED_VERSION} pinned (the patch is for that version)", file=sys.stderr)
        return 2
    patch_find_and_modify()
    from secantus.cli import main as server_main

    args = list(sys.argv[1:] if argv is None else argv)
    if "--storage-path" not in args:
        args += ["--storage-path", ":memory:"]
    if "--standalone" not in args:
        args.append("--standalone")
    return int(server_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
