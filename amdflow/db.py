"""LaunchPad and amdflow's collections, from the settings: MongoDB or the embedded store.

MongoDB (production): ``AMDFLOW_LAUNCHPAD_FILE`` (or ``--launchpad``) names a LaunchPad
YAML such as ``fw_configs/my_launchpad.yaml``. amdflow's collections live in the same
database as the LaunchPad's and use the LaunchPad's connection.

Embedded (laptop default): FireWorks' mongomock store, a file in the campaign folder.
It is single-process (each process holds a private copy of the whole store and writes it
back), so amdflow

* holds an exclusive lock on the campaign folder while the store is open, and a second
  amdflow process fails at once with a message recommending MongoDB;
* keeps ONE in-memory store per process that every LaunchPad of the process shares (a
  second LaunchPad would otherwise load a stale private copy);
* writes the store back atomically (temp file + rename) after every Firework and on
  close, so an interrupted or killed run loses at most the Firework in flight, instead
  of everything (mongomock-persistence alone writes only at interpreter exit).

``MONGOMOCK_SERVERSTORE_FILE`` is set before FireWorks is imported (FireWorks reads it
at import), and ``FW_config.yaml`` + ``my_launchpad.yaml`` are written beside the store so
that ``lpad -l my_launchpad.yaml ...`` run in the campaign folder opens the same store
(while no amdflow process has it open).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amdflow.errors import AmdflowError, StoreBusyError
from amdflow.schemas import COLLECTIONS
from amdflow.settings import AmdflowSettings, get_settings

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fireworks import LaunchPad

STORE_FILE = "launchpad_store.json"
LOCK_FILE = ".amdflow.lock"
DB_NAME = "amdflow"
MONGO_TIMEOUT_MS = 5000


class EmbeddedStore:
    """The campaign folder's mongomock store, locked and shared inside this process."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STORE_FILE
        self._lock_fh: Any = None
        self._previous_env: str | None = None
        self.server_store: Any = None

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock_path = self.folder / LOCK_FILE
        fh = open(lock_path, "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StoreBusyError(
                f"the embedded store in {self.folder} is in use by another amdflow process (pid {holder}); "
                "it is single-process: wait for that process, or use MongoDB "
                "(AMDFLOW_LAUNCHPAD_FILE=fw_configs/my_launchpad.yaml) to run rockets in parallel"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh
        if not self.path.exists():
            self.path.write_text("{}")
        self._previous_env = os.environ.get("MONGOMOCK_SERVERSTORE_FILE")
        os.environ["MONGOMOCK_SERVERSTORE_FILE"] = str(self.path)
        self._write_fw_configs()
        import bson.json_util
        import mongomock.gridfs
        import mongomock_persistence  # noqa: F401 - patches mongomock's stores for (de)serialization
        from mongomock.store import DatabaseStore, ServerStore

        # FireWorks does this at import only when the variable was already set; do it
        # here too so that the import order of FireWorks does not matter.
        mongomock.gridfs.enable_gridfs_integration()

        try:
            data = bson.json_util.loads(self.path.read_text())
        except ValueError as err:
            self.close(flush=False)
            raise AmdflowError(
                f"embedded store {self.path} is unreadable ({err}): restore it from a backup or start a new campaign folder"
            ) from None
        store = ServerStore.__new__(ServerStore)
        store._filename = str(self.path)
        store._databases = {k: DatabaseStore.from_dict(v) for k, v in data.items()}
        self.server_store = store

    def _write_fw_configs(self) -> None:
        import yaml

        (self.folder / "my_launchpad.yaml").write_text(
            yaml.safe_dump({"host": "localhost", "name": DB_NAME, "logdir": None, "strm_lvl": "INFO"})
        )
        (self.folder / "FW_config.yaml").write_text(
            yaml.safe_dump(
                {
                    "MONGOMOCK_SERVERSTORE_FILE": str(self.path.resolve()),
                    "LAUNCHPAD_LOC": str((self.folder / "my_launchpad.yaml").resolve()),
                }
            )
        )

    def flush(self) -> None:
        """Write the store atomically (temp file + rename)."""
        if self.server_store is None:
            return
        import bson.json_util

        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(bson.json_util.dumps(self.server_store.to_dict()))
        os.replace(tmp, self.path)

    def client(self, *args: Any, **kwargs: Any) -> Any:
        """A mongomock client on the shared store (signature of pymongo.MongoClient)."""
        import mongomock

        return mongomock.MongoClient(_store=self.server_store)

    def close(self, flush: bool = True) -> None:
        if flush:
            self.flush()
        self.server_store = None
        if self._previous_env is None:
            os.environ.pop("MONGOMOCK_SERVERSTORE_FILE", None)
        else:
            os.environ["MONGOMOCK_SERVERSTORE_FILE"] = self._previous_env
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


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
        self.launchpad.workflows.create_index([("nodes", 1), ("locked", 1)])
        self.launchpad.launches.create_index([("launch_id", 1), ("state", 1)])
        self._indexed = True

    def flush(self) -> None:
        """Persist the embedded store now (no-op on MongoDB)."""
        if self.embedded is not None:
            self.embedded.flush()


def bulk_write(coll: Any, ops: list[Any]) -> int:
    """Unordered bulk write of UpdateOne/ReplaceOne ops (one command on MongoDB); returns how many matched.

    On mongomock the ops run one by one: its bulk_write rejects pymongo >= 4.11's
    ReplaceOne/UpdateOne (their new ``sort`` argument); in-process, that costs nothing.
    """
    if not ops:
        return 0
    if not type(coll).__module__.startswith("mongomock"):
        return int(coll.bulk_write(ops, ordered=False).matched_count)
    from pymongo import ReplaceOne, UpdateOne

    matched = 0
    for op in ops:
        if isinstance(op, ReplaceOne):
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
def open_db(campaign_dir: Path | None = None, settings: AmdflowSettings | None = None) -> Iterator[AmdflowDB]:
    """Open the configured database for the duration of a ``with`` block."""
    settings = settings or get_settings()
    if settings.launchpad_file is not None:
        lp = _mongo_launchpad(settings.launchpad_file, settings.rocket_log_level)
        _init_launchpad(lp)
        db = AmdflowDB(lp)
        db.ensure_indexes()
        yield db
        return
    if campaign_dir is None:
        raise AmdflowError("no database: give the campaign file (embedded store) or set AMDFLOW_LAUNCHPAD_FILE (MongoDB)")
    store = EmbeddedStore(Path(campaign_dir))
    store.open()
    try:
        from fireworks import LaunchPad

        # Every LaunchPad made inside the block (also by FireWorks itself) shares the store.
        with _client_class(store.client):
            lp = LaunchPad(host="localhost", name=DB_NAME, strm_lvl=settings.rocket_log_level)
            _init_launchpad(lp)
            db = AmdflowDB(lp, embedded=store)
            db.ensure_indexes()
            yield db
    finally:
        store.close()
