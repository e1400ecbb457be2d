"""Start the secantusdb MongoDB-wire server with three patches, for multi-process tests.

secantusdb 0.7.0b3 (GPL-2.0, used only as a separate test process) answers concurrent
``findAndModify`` commands on the same document without isolation: two FireWorks
rockets can check out the same Firework (measured: 199 launch docs for 200 Fireworks;
see ../shared/design/database.md). MongoDB makes findAndModify atomic per document; we
restore that here by serializing the server's findAndModify handler with one lock.

Its matcher tests ``{field: {$in: LIST}}`` by comparing each document value with every
element of LIST, so an update of a batch's N documents by ``fw_id $in`` costs N x N
comparisons (measured: a third of the server's time in a dedup batch of 256). MongoDB
answers ``$in`` from index bounds. ``patch_in_matcher`` answers a LIST of plain integers
and strings by set membership, with the same result (``tests/test_wire_server.py`` compares
it with the original on random documents); anything else takes the original path.

Its ``findAndModify`` finds the document, then writes with the filter ``{_id: ID, $and:
[query]}``; a filter with a ``$`` key takes no index on its write path, so every
findAndModify scanned the whole collection (measured at 403k Fireworks: 4.5-4.7 s for one
``find_one_and_update({fw_id: N})`` that a ``find_one`` answers in 8 ms; FireWorks' own
check-out and ``_upsert_fws`` send one per Firework). ``patch_id_point_writes`` gives a
write filter holding an ``_id`` equality the ``_id`` point lookup; the server still tests the
whole filter on that document, so the answer is the same (``tests/test_wire_server.py``).
Run: ``python -m amdflow.testing.wire_server --port N``.
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


def _plain(v: Any) -> bool:
    return type(v) is int or type(v) is str  # not bool (MongoDB: true is not 1), not a subclass


def _in_fast(values: list[Any], arg: list[Any], members: frozenset[Any], descend: bool) -> bool | None:
    """``$in`` of plain ints/strings by membership; None where a value needs the original comparison."""
    from secantus.query import MISSING, _Positional

    for v in values:
        if v is MISSING or v is None:
            continue  # matches only a None in arg, and arg holds none
        if _plain(v) or type(v) is float:
            if v in members:  # 3.0 == 3 and hashes equal, as MongoDB's numeric equality
                return True
            continue
        if isinstance(v, list) and not isinstance(v, _Positional):
            for e in v:
                if _plain(e) or type(e) is float:
                    if e in members:
                        return True
                elif e is None or isinstance(e, (dict, bool)):
                    continue  # a document or a bool never equals a plain int/str; a None only a None
                else:
                    return None
            if not descend:
                return None  # an array compared whole: leave it to the original
            continue
        if isinstance(v, (dict, bool)):
            continue
        return None
    return False


def patch_in_matcher() -> None:
    """Answer ``$in`` over plain ints/strings by set membership (idempotent; same result as the original)."""
    from secantus import query

    original = query._op_matches
    if getattr(original, "_amdflow_in", False):
        return

    last = threading.local()  # the query's LIST and its set: one query tests many documents against the same list

    def members_of(arg: list[Any]) -> frozenset[Any] | None:
        if getattr(last, "arg", None) is not arg or getattr(last, "n", -1) != len(arg):
            last.arg, last.n = arg, len(arg)  # (holding the list keeps its id from being reused)
            last.members = frozenset(arg) if all(_plain(a) for a in arg) else None
        return last.members

    @functools.wraps(original)
    def op_matches(values: list[Any], op: str, arg: Any, collation: Any = None, *, field: str = "", descend: bool = True) -> bool:
        if op == "$in" and collation is None and isinstance(arg, list) and len(arg) > 8:
            members = members_of(arg)
            if members is not None:
                got = _in_fast(values, arg, members, descend)
                if got is not None:
                    return got
        return original(values, op, arg, collation, field=field, descend=descend)

    op_matches._amdflow_in = True  # type: ignore[attr-defined]
    query._op_matches = op_matches


def patch_id_point_writes() -> None:
    """Write filters with an ``_id`` equality and more keys start from the ``_id`` point lookup (idempotent)."""
    from secantus import storage

    original = storage.Storage._try_index_id_keys
    if getattr(original, "_amdflow_id_point", False):
        return

    @functools.wraps(original)
    def try_index_id_keys(self: Any, db: str, coll: str, filter: dict[str, Any], *, collation: Any = None) -> Any:
        if (collation is None and isinstance(filter, dict) and len(filter) > 1 and "_id" in filter
                and not isinstance(filter["_id"], (dict, list))):
            # a document matching the filter has this _id: the candidates are that one document (or none); the caller
            # tests the whole filter on each candidate
            got = original(self, db, coll, {"_id": filter["_id"]}, collation=None)
            if got is not None:
                return got
        return original(self, db, coll, filter, collation=collation)

    try_index_id_keys._amdflow_id_point = True  # type: ignore[attr-defined]
    storage.Storage._try_index_id_keys = try_index_id_keys


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    found = version("secantusdb")
    if found != PINNED_VERSION:
        print(f"wire_server: secantusdb {found} found, {PINNED_VERSION} pinned (the patch is for that version)", file=sys.stderr)
        return 2
    patch_find_and_modify()
    patch_in_matcher()
    patch_id_point_writes()
    from secantus.cli import main as server_main

    args = list(sys.argv[1:] if argv is None else argv)
    if "--storage-path" not in args:
        args += ["--storage-path", ":memory:"]
    if "--standalone" not in args:
        args.append("--standalone")
    return int(server_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
