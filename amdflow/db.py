"""LaunchPad and amdflow's collections, from the settings: MongoDB or the embedded store.

MongoDB (production): ``AMDFLOW_LAUNCHPAD_FILE`` (or ``--launchpad``) names a LaunchPad
YAML such as ``fw_configs/my_launchpad.yaml``. amdflow's collections live in the same
database as the LaunchPad's and use the LaunchPad's connection.

Embedded (laptop default): FireWorks' mongomock store in the campaign folder,
single-process, locked, persisted as a snapshot plus a journal after every Firework
(:mod:`amdflow.embedded` says how and what a kill -9 loses).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amdflow.embedded import (  # noqa: F401 - re-exported
    DB_NAME,
    JOURNAL_FILE,
    LOCK_FILE,
    STORE_FILE,
    EmbeddedStore,
)
from amdflow.errors import AmdflowError
from amdflow.schemas import COLLECTIONS
from amdflow.settings import AmdflowSettings, get_settings

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fireworks import LaunchPad

MONGO_TIMEOUT_MS = 5000


@dataclass
class AmdflowDB:
    """A LaunchPad plus amdflow's collections in the same database."""

    launchpad: LaunchPad
    embedded: EmbeddedStore | None = None
    _indexed: bool = field(default=False, repr=False)

    @classmethod
    def from_launchpad(cls, launchpad: LaunchPad) -> AmdflowDB:
        return cls(launchpad)

    @property
    def db(self) -> Any:
        return self.launchpad.db

    def coll(self, name: str) -> Any:
        if name not in COLLECTIONS:
            raise KeyError(f"not an amdflow collection: {name}")
        return self.launchpad.db[name]

    @property
    def campaigns(self) -> Any:
        return self.coll("campaigns")

    @property
    def candidates(self) -> Any:
        return self.coll("candidates")

    @property
    def tasks(self) -> Any:
        return self.coll("tasks")

    @property
    def references(self) -> Any:
        return self.coll("references")

    @property
    def thermo(self) -> Any:
        return self.coll("thermo")

    @property
    def thermo_builds(self) -> Any:
        return self.coll("thermo_builds")

    @property
    def known(self) -> Any:
        return self.coll("known")

    def ensure_indexes(self) -> None:
        """Create the indexes every CLI query uses (idempotent)."""
        if self._indexed:
            return
        for name, specs in COLLECTIONS.items():
            for keys, unique in specs:
                self.coll(name).create_index(keys, unique=unique)
        # amdflow's queries on the LaunchPad's own collections (run, status, add)
        self.launchpad.fireworks.create_index([("spec.campaign", 1), ("state", 1)])
        self.launchpad.workflows.create_index([("metadata.campaign", 1), ("metadata.candidate_id", 1)])
        # the batched rocket's transient claim and lock fields (sparse: only docs mid-batch carry them)
        self.launchpad.fireworks.create_index("amdflow_claim.at", sparse=True)
        self.launchpad.workflows.create_index("locked", sparse=True)
        # the batched rocket's filters, every field in one index (a planner that will not filter after an index scan,
        # like the wire test server's, otherwise scans the collection for each; MongoDB would use fw_id / nodes alone)
        self.launchpad.fireworks.create_index([("fw_id", 1), ("amdflow_claim.token", 1)])
        # the batched rocket's check-out: equalities first, then the sort (campaign last: rockets without one use the prefix)
        self.launchpad.fireworks.create_index([("state", 1), ("spec._category", 1), ("spec.amdflow_stage", 1), ("spec.campaign", 1),
                                               ("spec._priority", -1)])
        self.launchpad.workflows.create_index([("nodes", 1), ("locked", 1)])
        self.launchpad.launches.create_index([("launch_id", 1), ("state", 1)])
        self._indexed = True

    def flush(self) -> None:
        """Persist the embedded store now (no-op on MongoDB)."""
        if self.embedded is not None:
            self.embedded.flush()


def bulk_write(coll: Any, ops: list[Any]) -> int:
    """Unordered bulk write of UpdateOne/UpdateMany/ReplaceOne ops (one command on MongoDB); returns how many matched.

    On mongomock the ops run one by one: its bulk_write rejects pymongo >= 4.11's
    ReplaceOne/UpdateOne (their new ``sort`` argument); in-process, that costs nothing.
    """
    if not ops:
        return 0
    if not type(coll).__module__.startswith("mongomock"):
        return int(coll.bulk_write(ops, ordered=False).matched_count)
    from pymongo import ReplaceOne, UpdateMany, UpdateOne

    matched = 0
    for op in ops:
        if isinstance(op, UpdateMany):
            matched += coll.update_many(op._filter, op._doc, upsert=bool(op._upsert)).matched_count
        elif isinstance(op, ReplaceOne):
            matched += coll.replace_one(op._filter, op._doc, upsert=bool(op._upsert)).matched_count
        elif isinstance(op, UpdateOne):
            matched += coll.update_one(op._filter, op._doc, upsert=bool(op._upsert)).matched_count
        else:
            raise TypeError(f"bulk_write: unsupported operation {type(op).__name__}")
    return matched


def _init_launchpad(lp: LaunchPad) -> None:
    """Initialize an empty LaunchPad database (never touches one that holds work)."""
    if lp.fw_id_assigner.count_documents({}) == 0 and lp.fireworks.count_documents({}) == 0:
        lp.reset(password=None, require_password=False, max_reset_wo_password=1)


@contextlib.contextmanager
def _client_class(factory: Any) -> Iterator[None]:
    """Make FireWorks' LaunchPad build its client with ``factory`` inside the block."""
    import fireworks.core.launchpad as fw_launchpad

    original = fw_launchpad.MongoClient
    fw_launchpad.MongoClient = factory
    try:
        yield
    finally:
        fw_launchpad.MongoClient = original


def redact(text: str) -> str:
    """``text`` with the password of any MongoDB URI in it replaced by ``***``."""
    import re

    return re.sub(r"(mongodb(?:\+srv)?://[^:/@\s]*):[^/\s]*@", r"\1:***@", str(text))


def _warn_if_readable_by_others(path: Path, spec: dict[str, Any]) -> None:
    """A LaunchPad file holding a password should be readable by its owner only."""
    import re
    import stat

    has_secret = bool(spec.get("password")) or bool(re.search(r"//[^/@\s]*:[^/\s]*@", str(spec.get("host", ""))))
    if has_secret and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("%s holds a MongoDB password and is readable by other users: chmod 600 %s", path, path)


def _mongo_launchpad(path: Path, log_level: str) -> LaunchPad:
    import pymongo
    import yaml
    from fireworks import LaunchPad
    from pymongo.errors import OperationFailure, PyMongoError

    if not path.is_file():
        raise AmdflowError(f"LaunchPad file {path} not found: fix AMDFLOW_LAUNCHPAD_FILE / --launchpad")
    try:
        spec = yaml.safe_load(path.read_text())
        if not isinstance(spec, dict):
            raise TypeError("not a mapping")
    except Exception as err:
        raise AmdflowError(f"LaunchPad file {path} is invalid ({type(err).__name__}): compare with fw_configs/my_launchpad.yaml") from None
    _warn_if_readable_by_others(path, spec)
    kwargs = dict(spec.get("mongoclient_kwargs") or {})
    kwargs.setdefault("serverSelectionTimeoutMS", MONGO_TIMEOUT_MS)
    spec = {**spec, "mongoclient_kwargs": kwargs, "strm_lvl": log_level}
    # MongoDB mode always uses pymongo, even where FireWorks was imported in mongomock mode.
    try:
        with _client_class(pymongo.MongoClient):
            lp = LaunchPad.from_dict(spec)
    except (TypeError, ValueError, KeyError) as err:
        raise AmdflowError(f"LaunchPad file {path} is invalid ({type(err).__name__}: {err}): compare with fw_configs/my_launchpad.yaml") from None
    try:
        lp.connection.admin.command("ping")
        lp.db.list_collection_names()
    except OperationFailure as err:
        raise AmdflowError(
            f"MongoDB at {redact(lp.host)} refused access to database '{lp.name}' ({err.code}): check username/password/authsource in {path}"
        ) from None
    except PyMongoError as err:
        raise AmdflowError(
            f"cannot reach MongoDB at {redact(lp.host)} ({type(err).__name__}): start the server or fix host/port in {path}"
        ) from None
    return lp


@contextlib.contextmanager
def open_db(campaign_dir: Path | None = None, settings: AmdflowSettings | None = None, read_only: bool = False) -> Iterator[AmdflowDB]:
    """Open the configured database for the duration of a ``with`` block.

    ``read_only``: no write at all (no LaunchPad initialisation, no index creation: a MongoDB
    user with the ``read`` role suffices); on the embedded store, an in-memory copy as of
    opening, its lock released at once (see :meth:`EmbeddedStore.open`).
    """
    settings = settings or get_settings()
    if settings.launchpad_file is not None:
        lp = _mongo_launchpad(settings.launchpad_file, settings.rocket_log_level)
        db = AmdflowDB(lp)
        if not read_only:
            _init_launchpad(lp)
            db.ensure_indexes()
        yield db
        return
    if campaign_dir is None:
        raise AmdflowError("no database: give the campaign file (embedded store) or set AMDFLOW_LAUNCHPAD_FILE (MongoDB)")
    store = EmbeddedStore(Path(campaign_dir))
    store.open(read_only=read_only)
    try:
        from fireworks import LaunchPad

        # Every LaunchPad made inside the block (also by FireWorks itself) shares the store.
        with _client_class(store.client):
            lp = LaunchPad(host="localhost", name=DB_NAME, strm_lvl=settings.rocket_log_level)
            db = AmdflowDB(lp, embedded=store)
            if not read_only:
                _init_launchpad(lp)
                db.ensure_indexes()
            yield db
    finally:
        store.close()
