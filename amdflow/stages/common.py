"""What every stage shares: the campaign's stored settings, candidate state, claims, failpoints."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from amdflow import __version__
from amdflow.campaign import CampaignConfig, stored_campaign_from_dict
from amdflow.db import AmdflowDB
from amdflow.errors import AmdflowError
from amdflow.schemas import CampaignDoc, CandidateState, utcnow

logger = logging.getLogger(__name__)


def run_type_of(cfg: CampaignConfig) -> str:
    """Run type of a campaign's relax engine (energies comparable only within one)."""
    from amdflow.relax import get_engine

    return get_engine(cfg.relax).run_type


def funnel_run_type_of(cfg: CampaignConfig) -> str | None:
    """Run type of the funnel's potential (its own hull), or None without a funnel."""
    if not cfg.funnel.enabled:
        return None
    from amdflow.relax import get_funnel_engine

    return get_funnel_engine(cfg.funnel).run_type


def campaign_doc(cfg: CampaignConfig) -> CampaignDoc:
    return CampaignDoc(
        name=cfg.name,
        chemsys=cfg.chemsys,
        elements=cfg.elements,
        config=cfg.model_dump(mode="json"),
        config_hash=cfg.config_hash(),
        run_type=run_type_of(cfg),
        funnel_run_type=funnel_run_type_of(cfg),
        output_dir=str(cfg.output_dir),
        code_version=__version__,
    )


def load_campaign_config(db: AmdflowDB, name: str) -> tuple[CampaignConfig, dict[str, Any]]:
    doc = db.campaigns.find_one({"name": name}, {"_id": 0})
    if doc is None:
        raise AmdflowError(f"campaign '{name}' is not in the database: add it with `amdflow add CAMPAIGN.yaml`")
    cfg = stored_campaign_from_dict(doc["config"], source=f"campaign '{name}' (stored)")
    if doc.get("screen_checkpoint"):  # a round's fine-tuned CGCNN (amdflow.stages.rounds) screens from then on
        object.__setattr__(cfg.screen, "checkpoint", doc["screen_checkpoint"])
    if doc.get("funnel_checkpoint"):  # a round's fine-tuned SevenNet relaxes the funnel's candidates from then on
        for key, value in (("checkpoint", doc["funnel_checkpoint"]), ("model", None), ("modal", None),
                           ("correction", doc["funnel_checkpoint_correction"])):
            object.__setattr__(cfg.funnel, key, value)
    return cfg, doc


def set_state(db: AmdflowDB, candidate_id: str, state: CandidateState, **fields: Any) -> None:
    db.candidates.update_one(
        {"candidate_id": candidate_id},
        {"$set": {"state": state.value, "updated_at": utcnow(), **fields}},
    )


def record_failure(db: AmdflowDB, candidate_id: str, stage: str, err: BaseException) -> None:
    """Mark a candidate failed with a one-line reason (the Firework fizzles too)."""
    msg = f"{stage}: {type(err).__name__}: {err}".replace("\n", " ")[:500]
    set_state(db, candidate_id, CandidateState.FAILED, error=msg)


def load_candidate(db: AmdflowDB, candidate_id: str) -> dict[str, Any]:
    doc = db.candidates.find_one({"candidate_id": candidate_id}, {"_id": 0})
    if doc is None:
        raise AmdflowError(f"candidate {candidate_id} is not in the database: was it deleted? re-add the campaign")
    return doc


CLAIM_STALE_S = 300.0  # a claim older than this belongs to a dead rocket and may be taken over
HULL_CLAIM_STALE_S = 120.0  # hull builds take seconds; a claim this old was left by a dead process


class ClaimTimeout(AmdflowError):
    """A claim another process holds could not be had within the timeout."""


def _heartbeat(locks: Any, key: str, owner: str, every_s: float, stop: Any) -> None:
    """Keep a held claim fresh (its ``at``) until ``stop`` is set, so that no process takes it over as stale."""
    from pymongo.errors import PyMongoError

    while not stop.wait(every_s):
        try:
            locks.update_one({"_id": key, "owner": owner}, {"$set": {"at": utcnow()}})
        except PyMongoError:  # a restarting server: the next beat tries again
            logger.debug("claim %s: heartbeat failed; retrying", key)


@contextlib.contextmanager
def claim(db: AmdflowDB, key: str, timeout_s: float = 600.0, stale_s: float = CLAIM_STALE_S,
          wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive claim on ``key`` across processes (MongoDB's unique _id makes the insert atomic).

    A claim not refreshed for ``stale_s`` belongs to a dead process and is taken over; while
    held, a heartbeat thread refreshes it every ``stale_s / 4`` (on MongoDB: the embedded
    store is one process), so work that outlasts ``stale_s`` (an O(N^2) matching) keeps it.
    Releasing is retried for a while, so a database restart during the claim does not leave
    it behind (``amdflow rerun --lost`` also clears stale claims). ``wait=False``: one try;
    the block gets False (and must do nothing) when another process holds the claim. Raises
    :class:`ClaimTimeout` after ``timeout_s`` of waiting.
    """
    import os
    import random
    import socket
    import threading
    import time

    from pymongo.errors import DuplicateKeyError, PyMongoError

    locks = db.coll("locks")
    owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32)}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            locks.insert_one({"_id": key, "owner": owner, "at": utcnow()})
            break
        except DuplicateKeyError:
            stale = utcnow().timestamp() - stale_s
            taken_over = locks.delete_one({"_id": key, "at": {"$lt": datetime.fromtimestamp(stale, UTC)}}).deleted_count
            if not wait and not taken_over:
                yield False
                return
            if time.monotonic() > deadline:
                raise ClaimTimeout(f"could not claim '{key}' within {timeout_s:.0f} s: is a rocket stuck? "
                                   "`amdflow rerun CAMPAIGN --lost` clears stale claims") from None
            time.sleep(0.02 + random.random() * 0.05)
    stop = threading.Event()
    beat = None
    if not type(locks).__module__.startswith("mongomock"):
        beat = threading.Thread(target=_heartbeat, args=(locks, key, owner, stale_s / 4, stop), daemon=True,
                                name=f"claim-heartbeat {key}")
        beat.start()
    try:
        yield True
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=5)
        for attempt in range(8):  # about 30 s: a restarting server comes back
            try:
                locks.delete_one({"_id": key, "owner": owner})
                break
            except PyMongoError:
                if attempt == 7:
                    logger.warning("claim %s could not be released (database unreachable); it expires after %.0f s", key, stale_s)
                    break
                time.sleep(0.25 * 2**attempt)


def failpoint_delay(name: str) -> None:
    """Sleep for the seconds in environment variable ``name`` (tests only; unset in production)."""
    import os
    import time

    value = os.environ.get(name)
    if value:
        time.sleep(float(value))
