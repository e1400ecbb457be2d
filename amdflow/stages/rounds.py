"""Active-learning rounds within the DFT budget: each round's own results retrain the ranking of the next.

GNoME's hit rate rose from under 10 % to over 80 % over six rounds because each round's DFT
retrained the models that ranked the next (``../shared/design/energies-and-search.md``). A
campaign with ``rounds:`` spends ``relax.budget`` in rounds of ``rounds.size`` final
relaxations:

* **An allocation per round.** Round k holds a limit on ``budget_used``; the budget slot's one
  conditional increment (:func:`take_slot`) checks the round too, so parallel rockets never
  start more than the round's share. A candidate that takes a slot records its round (and so
  does its final task document); one that finds the round's share taken waits as
  ``over_budget`` for the next round.
* **A round is finished** when every candidate that took one of its slots is analyzed (or
  failed), and either its share is used or nothing of the campaign is left to run.
* **Closing it** (:func:`close_round`, one process under a claim, each step recorded on the
  campaign document so that a killed close resumes where it stopped): the round's figures
  (relaxed, hits within ``hit_e_above_hull`` on the final hull, hit rate, the stable phases on
  the hull then); with ``retrain: [cgcnn]`` CGCNN is fine-tuned on the campaign's hull from the
  checkpoint in use, kept as ``<output_dir>/rounds/cgcnn-round-<k>.pth.tar`` with its sha256
  (predictions record it as their ``model_id``), and becomes the screen's checkpoint; the
  waiting pool is ranked again (every candidate whose final relaxation has not started,
  ``over_budget`` ones included, is predicted and screened again: a funnel relaxation under
  the unchanged potential is read back, not redone). Then the stop rule: relax.budget spent,
  ``max_rounds`` reached, a hit rate below ``min_hit_rate``, or nothing left to relax.
* **Opening round k+1** raises the allocation by ``size`` (within relax.budget) and releases
  the waiting candidates, best-ranked first, through their Fireworks.

The pure parts (:func:`round_figures`, :func:`stop_reason`) take documents and return
figures; the rest reads and writes the campaign's collections, as the other stages do.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amdflow.campaign import CampaignConfig, RoundsConfig
from amdflow.db import AmdflowDB
from amdflow.errors import AmdflowError
from amdflow.schemas import CandidateState, utcnow
from amdflow.stages.common import claim, failpoint_delay, load_campaign_config

logger = logging.getLogger(__name__)

#: Candidate states in which a round's relaxation is finished (its hull position known, or it failed).
FINISHED = (CandidateState.ANALYZED.value, CandidateState.FAILED.value)
#: Firework states of work still to do.
PENDING_FW = ("READY", "WAITING", "RESERVED", "RUNNING")
#: Stages whose Fireworks can still lead a candidate to a slot (analyze takes none: a round's own analyze
#: Fireworks, still RUNNING while they close it, must not count).
SLOT_STAGES = ("predict", "dedup", "funnel", "relax")
ROUNDS_DIR = "rounds"


class RoundError(AmdflowError):
    """A round cannot be closed or opened as asked (the message says why and what to do)."""


@dataclass
class RoundFigures:
    """One round's outcome."""

    k: int
    slots: int  # final relaxations started in the round
    relaxed: int  # of them analyzed (on the final hull)
    failed: int
    hits: int  # analyzed at most hit_e_above_hull above the final hull
    hit_rate: float | None  # hits / relaxed
    stable_on_hull: list[str] = field(default_factory=list)  # the campaign's stable candidates' formulas at the close
    checkpoint: str | None = None  # the CGCNN checkpoint this round's close trained (path), if any
    checkpoint_sha256: str | None = None
    train_metrics: dict[str, Any] | None = None
    adopted: bool | None = None  # the round's fine-tuned CGCNN replaced the one in use (it did better on held-out data)
    why: str | None = None  # why it was, or was not
    pool_reranked: int = 0  # candidates predicted and screened again
    released: int = 0  # waiting candidates released into the next round
    potential: dict[str, Any] | None = None  # retrain potential: the fine-tuned checkpoint, its metrics, adopted or not
    pool_refunneled: int = 0  # waiting candidates relaxed again under an adopted potential

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_figures(k: int, members: list[dict[str, Any]], hit_e_above_hull: float,
                  stable_formulas: list[str]) -> RoundFigures:
    """Pure: round ``k``'s figures from the documents of the candidates that took its slots (state, thermo)."""
    relaxed = [c for c in members if c.get("state") == CandidateState.ANALYZED.value]
    failed = sum(c.get("state") == CandidateState.FAILED.value for c in members)
    hits = sum((c.get("thermo") or {}).get("e_above_hull", float("inf")) <= hit_e_above_hull + 1e-9 for c in relaxed)
    return RoundFigures(k=k, slots=len(members), relaxed=len(relaxed), failed=failed, hits=hits,
                        hit_rate=None if not relaxed else round(hits / len(relaxed), 4),
                        stable_on_hull=sorted(stable_formulas))


def stop_reason(cfg: RoundsConfig, figures: RoundFigures, budget: int | None, used: int, pool_left: bool) -> str | None:
    """Pure: why no further round opens after ``figures`` (None: the next one opens)."""
    if budget is not None and used >= budget:
        return f"relax.budget of {budget} spent"
    if cfg.max_rounds is not None and figures.k >= cfg.max_rounds:
        return f"max_rounds {cfg.max_rounds} reached"
    if cfg.min_hit_rate is not None and figures.hit_rate is not None and figures.hit_rate < cfg.min_hit_rate:
        return f"round {figures.k}'s hit rate {figures.hit_rate:.3f} fell below min_hit_rate {cfg.min_hit_rate}"
    if not pool_left:
        return "nothing left to relax: every candidate is relaxed, cut or screened out"
    if figures.slots == 0:
        return f"round {figures.k} relaxed nothing: no candidate of the pool passes the screen and the funnel"
    return None


def next_limit(rounds: RoundsConfig, budget: int | None, used: int) -> int:
    """The allocation (a bound on budget_used) of a round opened when ``used`` slots are taken."""
    limit = used + rounds.size
    return limit if budget is None else min(limit, budget)


def open_first_round(db: AmdflowDB, cfg: CampaignConfig) -> None:
    """Give a campaign with ``rounds:`` its first round (once; a campaign stored without rounds gets one too)."""
    if cfg.rounds is None:
        return
    doc = db.campaigns.find_one({"name": cfg.name}, {"round": 1, "budget_used": 1}) or {}
    if doc.get("round"):
        return
    used = int(doc.get("budget_used", 0))
    db.campaigns.update_one({"name": cfg.name, "round": {"$exists": False}}, {"$set": {"round": {
        "k": 1, "limit": next_limit(cfg.rounds, cfg.relax.budget, used), "start_used": used, "state": "open",
        "opened_at": utcnow()}, "rounds": []}})


def take_slot(db: AmdflowDB, cfg: CampaignConfig) -> tuple[bool, int | None, str]:
    """One atomic conditional increment of ``budget_used``: (taken, the round it belongs to, why not when not)."""
    limit = cfg.relax.budget
    if cfg.rounds is None:
        query: dict[str, Any] = {"name": cfg.name}
        if limit is not None:
            query["$or"] = [{"budget_used": {"$lt": limit}}, {"budget_used": {"$exists": False}}]
        if limit is not None and limit <= 0:
            return False, None, f"relax budget of {limit} spent: waits for `amdflow budget {cfg.name} +N`"
        taken = db.campaigns.find_one_and_update(query, {"$inc": {"budget_used": 1}}, {"_id": 1})
        return taken is not None, None, f"relax budget of {limit} spent: waits for `amdflow budget {cfg.name} +N`"
    for _ in range(5):  # the round may change between the read and the increment: read it again
        doc = db.campaigns.find_one({"name": cfg.name}, {"round": 1})
        rnd = (doc or {}).get("round")
        if not rnd or rnd.get("state") != "open":
            state = "stopped" if rnd and rnd.get("state") == "stopped" else "closing"
            return False, None, (f"the rounds have {state}: waits for `amdflow budget {cfg.name} +N` and `amdflow round`"
                                 if state == "stopped" else "round closing: waits for the next round")
        query = {"name": cfg.name, "round.k": rnd["k"], "round.state": "open",
                 "$or": [{"budget_used": {"$lt": rnd["limit"]}}, {"budget_used": {"$exists": False}}]}
        if rnd["limit"] > 0 and db.campaigns.find_one_and_update(query, {"$inc": {"budget_used": 1}}, {"_id": 1}) is not None:
            return True, int(rnd["k"]), ""
        again = (db.campaigns.find_one({"name": cfg.name}, {"round": 1}) or {}).get("round") or {}
        if again.get("k") == rnd["k"] and again.get("state") == "open":
            return False, None, (f"round {rnd['k']}'s share of {cfg.rounds.size} relaxations is taken: waits for round "
                                 f"{rnd['k'] + 1}")
    return False, None, "the round changed five times while taking a slot: waits for the next round"


def round_status(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the campaign's rounds stand: the open round, its share used, finished or not (and why not)."""
    doc = doc or db.campaigns.find_one({"name": cfg.name}, {"_id": 0, "round": 1, "rounds": 1, "budget_used": 1}) or {}
    rnd = doc.get("round")
    if not rnd:
        return {"enabled": cfg.rounds is not None, "k": None, "history": doc.get("rounds") or []}
    used = int(doc.get("budget_used", 0))
    members = list(db.candidates.find({"campaign": cfg.name, "round": rnd["k"]}, {"_id": 0, "state": 1}))
    open_members = sum(c.get("state") not in FINISHED for c in members)
    share_used = used >= rnd["limit"]
    pool_left = _pool_left(db, cfg.name)
    finished = rnd["state"] == "open" and open_members == 0 and (share_used or not pool_left)
    why = ("" if finished else f"{open_members} of its relaxations still running or waiting" if open_members
           else f"{rnd['limit'] - used} of its slots not taken yet" if pool_left and not share_used else rnd["state"])
    return {"enabled": True, "k": rnd["k"], "state": rnd["state"], "limit": rnd["limit"], "used": used,
            "slots": len(members), "unfinished": open_members, "finished": finished, "waiting_for": why,
            "pool_left": pool_left, "stop_reason": rnd.get("stop_reason"), "history": doc.get("rounds") or []}


def _pool_left(db: AmdflowDB, campaign: str) -> bool:
    """Whether anything of the campaign could still take a slot: work queued, or candidates waiting for one."""
    if db.candidates.find_one({"campaign": campaign, "state": CandidateState.OVER_BUDGET.value}, {"_id": 1}):
        return True
    return db.launchpad.fireworks.find_one({"spec.campaign": campaign, "state": {"$in": list(PENDING_FW)},
                                            "spec.amdflow_stage": {"$in": list(SLOT_STAGES)}}, {"_id": 1}) is not None


def advance_quietly(db: AmdflowDB, name: str) -> dict[str, Any] | None:
    """:func:`advance` for the automatic mode (a Firework's end, an idle rocket, `amdflow run`): never raises; a round
    that cannot be closed (too little to retrain on, say) records why on the campaign (``round.error``: `amdflow
    status` shows it) and waits for `amdflow round`."""
    try:
        cfg, doc = load_campaign_config(db, name)
        if cfg.rounds is None or not cfg.rounds.auto or (doc.get("round") or {}).get("state") == "stopped":
            return None
        out = advance(db, name)
        if out.get("closed"):
            db.campaigns.update_one({"name": name}, {"$unset": {"round.error": ""}})
        return out
    except Exception as err:  # the Firework that called it has done its own work: this must not fizzle it
        logger.warning("campaign %s: the round could not be closed: %s", name, err)
        # the database itself may be away: then the next analysis, idle run or `amdflow round` tries again
        with contextlib.suppress(Exception):
            db.campaigns.update_one({"name": name, "round": {"$exists": True}},
                                    {"$set": {"round.error": f"{type(err).__name__}: {err}"[:500]}})
        return None


def advance(db: AmdflowDB, name: str, force: bool = False) -> dict[str, Any]:
    """Close the campaign's round when it is finished (``force``: when it has started no relaxation it could still
    finish, i.e. close it now even with slots left) and open the next. Returns what happened. Safe to call from many
    processes: one closes, the others find it closed or closing."""
    cfg, _ = load_campaign_config(db, name)
    if cfg.rounds is None:
        raise RoundError(f"campaign '{name}' has no rounds: add a `rounds:` section (e.g. size: 50) and `amdflow add` it")
    open_first_round(db, cfg)
    status = round_status(db, cfg)
    if status["state"] == "stopped":
        return {"closed": None, "opened": None, "status": status}
    if status["state"] == "open" and not status["finished"] and not (force and status["unfinished"] == 0):
        return {"closed": None, "opened": None, "status": status}
    with claim(db, f"round:{name}", timeout_s=1.0, wait=False) as mine:
        if not mine:
            return {"closed": None, "opened": None, "status": status, "busy": True}
        return close_round(db, name)


def close_round(db: AmdflowDB, name: str) -> dict[str, Any]:
    """Close the open (or half-closed) round and open the next; the caller holds the round's claim. Each step is
    recorded on the campaign document (``round.closing``), so a process killed in between resumes from there."""
    cfg, doc = load_campaign_config(db, name)
    assert cfg.rounds is not None
    rnd = doc["round"]
    k = int(rnd["k"])
    if rnd["state"] == "open":
        db.campaigns.update_one({"name": name, "round.k": k, "round.state": "open"},
                                {"$set": {"round.state": "closing", "round.closing": {}}})
    closing = (db.campaigns.find_one({"name": name}, {"round": 1})["round"].get("closing")) or {}
    members = list(db.candidates.find({"campaign": name, "round": k}, {"_id": 0, "state": 1, "thermo": 1}))
    stable = [t["formula"] for t in db.thermo.find({"campaign": name, "hull_chemsys": cfg.chemsys, "run_type": doc["run_type"],
                                                    "kind": "candidate", "is_stable": True}, {"formula": 1})]
    figures = round_figures(k, members, cfg.rounds.hit_e_above_hull, stable)
    used = int(doc.get("budget_used", 0))
    if "reason" not in closing:  # decided once, before the pool is touched (a rerank would refill it)
        closing["reason"] = stop_reason(cfg.rounds, figures, cfg.relax.budget, used, _pool_left(db, name))
        db.campaigns.update_one({"name": name}, {"$set": {"round.closing": closing}})
    reason = closing["reason"]
    if "cgcnn" in cfg.rounds.retrain and reason is None:  # the next round's ranking: retrained on this round's results
        if "adopted" not in closing:
            (Path(cfg.output_dir or ".") / ROUNDS_DIR).mkdir(parents=True, exist_ok=True)
            failpoint_delay("AMDFLOW_FAILPOINT_ROUND_TRAIN_DELAY_S")  # tests: a close surely killed while it trains
            closing = {**closing, **retrain_cgcnn(db, cfg, doc, k)}
            db.campaigns.update_one({"name": name}, {"$set": {"round.closing": closing}})
        figures.checkpoint = closing.get("checkpoint")
        figures.checkpoint_sha256 = closing.get("checkpoint_sha256")
        figures.train_metrics = closing.get("train_metrics")
        figures.adopted = bool(closing["adopted"])
        figures.why = closing.get("why")
        if closing["adopted"] and not closing.get("reranked_with"):
            db.campaigns.update_one({"name": name}, {"$set": {"screen_checkpoint": closing["checkpoint"],
                                                             "screen_checkpoint_sha256": closing["checkpoint_sha256"],
                                                             "screen_checkpoint_round": k}})
            counts = rerank_pool(db, cfg)
            closing = {**closing, "reranked_with": closing["checkpoint_sha256"], "pool_reranked": counts["reset"]}
            db.campaigns.update_one({"name": name}, {"$set": {"round.closing": closing}})
        figures.pool_reranked = int(closing.get("pool_reranked", 0))
    if "potential" in cfg.rounds.retrain and reason is None:  # the funnel's potential, tuned on the final engine's labels
        if "potential" not in closing:
            failpoint_delay("AMDFLOW_FAILPOINT_ROUND_TRAIN_DELAY_S")
            closing = {**closing, "potential": retrain_potential(db, cfg, doc, k)}
            db.campaigns.update_one({"name": name}, {"$set": {"round.closing": closing}})
        pot = closing["potential"]
        if pot["adopted"] and not closing.get("refunneled_with"):
            counts = adopt_potential(db, name, pot, k)
            closing = {**closing, "refunneled_with": pot["checkpoint_sha256"], "pool_refunneled": counts["reset"]}
            db.campaigns.update_one({"name": name}, {"$set": {"round.closing": closing}})
        figures.potential = pot
        figures.pool_refunneled = int(closing.get("pool_refunneled", 0))
    if reason is None:
        figures.released = db.candidates.count_documents({"campaign": name, "state": CandidateState.OVER_BUDGET.value})
    record = figures.as_dict() | {"closed_at": utcnow(), "stop_reason": reason}
    _write_summary(cfg, record)
    if reason is not None:
        db.campaigns.update_one({"name": name, "round.k": k}, {"$set": {"round.state": "stopped", "round.stop_reason": reason},
                                                               "$push": {"rounds": record}})
        logger.info("campaign %s: round %d closed, rounds stopped: %s", name, k, reason)
        return {"closed": record, "opened": None, "status": round_status(db, cfg)}
    cfg, doc = load_campaign_config(db, name)
    used = int(doc.get("budget_used", 0))
    nxt = {"k": k + 1, "limit": next_limit(cfg.rounds, cfg.relax.budget, used), "start_used": used, "state": "open",
           "opened_at": utcnow()}
    db.campaigns.update_one({"name": name, "round.k": k}, {"$set": {"round": nxt}, "$push": {"rounds": record}})
    release_waiting(db, name)
    logger.info("campaign %s: round %d closed (%d hits of %d), round %d opened (limit %d)", name, k, figures.hits,
                figures.relaxed, k + 1, nxt["limit"])
    return {"closed": record, "opened": nxt, "status": round_status(db, cfg)}


def _write_summary(cfg: CampaignConfig, record: dict[str, Any]) -> None:
    """<output_dir>/rounds/round-<k>.json: the round's figures for people and scripts (the database holds the same)."""
    import json

    folder = Path(cfg.output_dir or ".") / ROUNDS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".round-{record['k']}.json.partial"
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(folder / f"round-{record['k']}.json")
    except OSError as err:  # the figures are in the database: a full disk loses only this copy
        logger.warning("round %s summary not written: %s", record["k"], err)


def retrain_cgcnn(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any], k: int) -> dict[str, Any]:
    """Fine-tune the screen's CGCNN (the checkpoint in use) on the campaign's hull; the checkpoint of round ``k`` is
    written under <output_dir>/rounds/ (atomically: a killed write leaves none). It is adopted only when it beats the
    checkpoint in use on the held-out validation materials (a few dozen DFT results can make a pretrained model worse:
    measured, 3 materials took the validation MAE from 0.07 to 1.07 eV/atom, and that model screened out every
    candidate). Returns its path, sha256, metrics, and whether (and why) it was adopted."""
    from amdflow.screen.checkpoint import file_sha256, load_checkpoint
    from amdflow.screen.predict import iter_graphs
    from amdflow.screen.train import TrainSettings, data_hash, save_checkpoint, train
    from amdflow.stages.training import campaign_training_data

    try:
        ids, sources, values = campaign_training_data(db, cfg.name)
    except AmdflowError:
        ids = []
    relaxed = db.candidates.count_documents({"campaign": cfg.name, "state": CandidateState.ANALYZED.value})
    if relaxed == 0 or len(ids) < 3:
        raise RoundError(f"round {k}: retraining CGCNN needs finished DFT results and the campaign has {relaxed} "
                         f"relaxed candidates ({len(ids)} materials on its hull, 3 at least): let the round's "
                         "relaxations finish, or set rounds.retrain: []")
    graphs, kept_ids, kept_values = [], [], []
    for i, g in enumerate(iter_graphs(sources, 1)):
        if isinstance(g, str):
            continue
        graphs.append(g)
        kept_ids.append(ids[i])
        kept_values.append(values[i])
    settings = TrainSettings(epochs=cfg.rounds.epochs, patience=cfg.rounds.patience, seed=k)
    parent = load_checkpoint(doc.get("screen_checkpoint") or cfg.screen.checkpoint)
    result = train(graphs, kept_values, parent, settings)
    folder = Path(cfg.output_dir or ".") / ROUNDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"cgcnn-round-{k}.pth.tar"
    tmp = folder / f".cgcnn-round-{k}.partial.pth.tar"
    path, meta = save_checkpoint(result, tmp, settings, parent, kept_ids, data_hash(kept_ids, kept_values, graphs),
                                 f"campaign {cfg.name}, round {k}")
    meta.replace(final.with_suffix(".json"))
    path.replace(final)
    metrics = {key: (round(v, 5) if isinstance(v, float) else v) for key, v in result.metrics.items()}
    metrics |= {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    before, after = result.metrics.get("parent_val_mae"), result.metrics["val_mae"]
    adopted = before is None or after < before
    why = (f"validation MAE {after:.4f} against the checkpoint in use's {before:.4f} eV/atom on the same held-out "
           f"materials ({len(result.split['val'])})" if before is not None else "no checkpoint in use to compare with")
    return {"checkpoint": str(final.resolve()), "checkpoint_sha256": file_sha256(final), "train_metrics": metrics,
            "trained_on": len(graphs), "adopted": adopted, "why": ("adopted: " if adopted else "kept the one in use: ") + why}


def potential_training_data(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(frames, the relaxation each belongs to): the labels of every final relaxation of the campaign (its candidates,
    and the elemental references and known phases of its final run type)."""
    frames, groups = [], []
    query = {"run_type": run_type, "level": {"$ne": "funnel"}, "labels": {"$ne": None},
             "$or": [{"campaign": cfg.name}, {"kind": {"$in": ["reference", "known"]}, "elements": {"$in": cfg.elements}}]}
    for task in db.tasks.find(query, {"_id": 0, "task_id": 1, "labels": 1, "elements": 1}).sort("task_id", 1):
        if not set(task["elements"]) <= set(cfg.elements):
            continue
        for frame in task["labels"] or []:
            frames.append(frame)
            groups.append(task["task_id"])
    return frames, groups


def retrain_potential(db: AmdflowDB, cfg: CampaignConfig, doc: dict[str, Any], k: int) -> dict[str, Any]:
    """Fine-tune the funnel's SevenNet (the checkpoint in use) on the final engine's labels; the checkpoint of round
    ``k`` is kept as <output_dir>/rounds/sevennet-round-<k>.pth, adopted only when its energy error on the held-out
    relaxations beats the one in use. Returns its path, sha256, the correction its energies need, metrics, and
    whether (and why) it was adopted."""
    from amdflow.relax.base import file_sha256
    from amdflow.relax.finetune import (
        MIN_HELD_OUT,
        FineTuneError,
        FineTuneSettings,
        finetune_sevennet,
        tuned_correction,
    )
    from amdflow.settings import get_settings, resolve_device

    corr = tuned_correction(_final_scheme(cfg), cfg.relax.engine.value)
    frames, groups = potential_training_data(db, cfg, doc["run_type"])
    relaxations = len(set(groups))
    if relaxations < 2:
        raise RoundError(f"round {k}: fine-tuning the funnel's potential needs finished final relaxations with labels "
                         f"and the campaign has {relaxations}: let the round's relaxations finish, or set "
                         "rounds.retrain: [cgcnn]")
    parent = doc.get("funnel_checkpoint") or cfg.funnel.model or "7net-0"
    folder = Path(cfg.output_dir or ".") / ROUNDS_DIR
    final = folder / f"sevennet-round-{k}.pth"
    settings = FineTuneSettings(epochs=cfg.rounds.potential_epochs, lr=cfg.rounds.potential_lr, seed=k)
    try:
        result = finetune_sevennet(frames, groups, str(parent), final, settings, resolve_device(get_settings()))
    except FineTuneError as err:
        raise RoundError(f"round {k}: {err}") from err
    adopted = result.better
    why = (f"held-out energy MAE {result.val_energy_mae:.4f} against the potential in use's "
           f"{result.parent_val_energy_mae:.4f} eV/atom on the same {result.val_relaxations} relaxations")
    if result.val_relaxations < MIN_HELD_OUT:
        why += f", too few to trust ({MIN_HELD_OUT} needed: about {5 * MIN_HELD_OUT} labelled final relaxations)"
    metrics = {key: (round(v, 6) if isinstance(v, float) else v) for key, v in result.as_dict().items()
               if key not in ("checkpoint", "history")}
    return {"checkpoint": str(final.resolve()), "checkpoint_sha256": file_sha256(final), "correction": corr,
            "parent": str(parent), "metrics": metrics, "trained_on": relaxations, "adopted": adopted,
            "why": ("adopted: " if adopted else "kept the one in use: ") + why}


def _final_scheme(cfg: CampaignConfig) -> str:
    """The correction scheme of the campaign's final run type (what its energies need)."""
    from amdflow.relax import get_engine

    return get_engine(cfg.relax).correction.scheme.value


def adopt_potential(db: AmdflowDB, name: str, pot: dict[str, Any], k: int) -> dict[str, int]:
    """The round's fine-tuned potential becomes the funnel's: a new funnel run type (the checkpoint's sha256 is part
    of it), so a new ML hull. Its elemental references and known phases are relaxed here, with the new potential
    (the few structures the hull needs, before any candidate is placed on it), and the waiting pool is relaxed
    again under it (:func:`refunnel_pool`). Relaxations of the old potential stay, on their own run type's hull."""
    from amdflow.ops import AddReport, add_known_phases
    from amdflow.stages.common import funnel_run_type_of
    from amdflow.stages.funnel import refresh_funnel_hull
    from amdflow.stages.relax import pending_references, relax_reference_stage

    db.campaigns.update_one({"name": name}, {"$set": {"funnel_checkpoint": pot["checkpoint"],
                                                     "funnel_checkpoint_sha256": pot["checkpoint_sha256"],
                                                     "funnel_checkpoint_correction": pot["correction"],
                                                     "funnel_checkpoint_round": k}})
    cfg, doc = load_campaign_config(db, name)
    run_type = str(funnel_run_type_of(cfg))
    pending = pending_references(db, cfg, run_type)
    if pending:
        db.references.insert_many([r.to_mongo() for r in pending], ordered=False)
    for ref in db.references.find({"run_type": run_type, "element": {"$in": cfg.elements}, "state": "pending",
                                   "kind": {"$ne": "known"}}, {"_id": 0, "element": 1, "prototype": 1}):
        relax_reference_stage(db, name, ref["element"], ref["prototype"], level="funnel")
    if cfg.analyze.known_phases is not None:  # the known phases on the new hull too (their workflow, at the funnel level)
        add_known_phases(db, cfg, run_type, AddReport(), level="funnel")
    previous = doc.get("funnel_run_type")
    if previous != run_type:  # (a close killed after this step runs it again: the history keeps the old one once)
        db.campaigns.update_one({"name": name}, {"$set": {"funnel_run_type": run_type},
                                                 "$addToSet": {"funnel_run_types": previous}})
    refresh_funnel_hull(db, cfg, run_type)
    return refunnel_pool(db, cfg, run_type)


def refunnel_pool(db: AmdflowDB, cfg: CampaignConfig, run_type: str) -> dict[str, int]:
    """Relax again, under the funnel's new potential, what the next rounds choose from: every candidate the old
    potential passed whose final relaxation has not started (``prerelaxed``, ``over_budget``). Their funnel Fireworks run
    again (batched as usual) and the chain after them follows. Candidates the old potential cut stay cut (relaxing them
    again would cost the funnel over; `amdflow refunnel` is for a changed cut), and those it has not relaxed yet meet
    the new potential when their turn comes."""
    lp = db.launchpad
    counts = {"reset": 0}
    query = {"campaign": cfg.name, "relax_started_at": None, "budget_slot": {"$ne": True},
             "funnel.run_type": {"$ne": run_type, "$exists": True},
             "state": {"$in": [CandidateState.PRERELAXED.value, CandidateState.OVER_BUDGET.value]}}
    for cand in db.candidates.find(query, {"candidate_id": 1, "fw_ids": 1}):
        fw_ids = cand.get("fw_ids") or {}
        if "funnel" not in fw_ids:
            continue
        lp.rerun_fw(fw_ids["funnel"])
        later = [fw_ids[s] for s in ("relax", "analyze") if s in fw_ids]
        for fw in lp.fireworks.find({"fw_id": {"$in": later}, "state": "DEFUSED"}, {"fw_id": 1}):
            lp.reignite_fw(fw["fw_id"])
        db.candidates.update_one({"candidate_id": cand["candidate_id"]}, {"$set": {
            "state": CandidateState.UNIQUE.value, "funnel": None, "updated_at": utcnow()}})
        counts["reset"] += 1
    db.flush()
    return counts


def rerank_pool(db: AmdflowDB, cfg: CampaignConfig) -> dict[str, int]:
    """Predict and screen again the candidates CGCNN ranks: every one whose final relaxation has not started
    (``over_budget`` ones included) and, with the funnel on, that the funnel's potential has not relaxed (those are
    ranked on its hull, which a new CGCNN does not move: they are released as they stand). Their predict Fireworks
    run again with the round's checkpoint and the chain after them (dedup, funnel, relax) follows."""
    lp = db.launchpad
    counts = {"reset": 0, "kept": 0}
    query: dict[str, Any] = {"campaign": cfg.name, "fw_ids.predict": {"$exists": True}, "relax_started_at": None,
                             "state": {"$nin": [CandidateState.RELAXED.value, CandidateState.ANALYZED.value,
                                                CandidateState.FAILED.value]}}
    if cfg.funnel.enabled:
        query["funnel"] = None
    for cand in db.candidates.find(query, {"candidate_id": 1, "fw_ids": 1, "state": 1}):
        fw_ids = cand["fw_ids"]
        lp.rerun_fw(fw_ids["predict"])
        later = [fw_ids[s] for s in ("dedup", "funnel", "relax", "analyze") if s in fw_ids]
        for fw in lp.fireworks.find({"fw_id": {"$in": later}, "state": "DEFUSED"}, {"fw_id": 1}):
            lp.reignite_fw(fw["fw_id"])  # an over_budget or cut candidate's defused chain takes part again
        db.candidates.update_one({"candidate_id": cand["candidate_id"]}, {"$set": {
            "state": CandidateState.GENERATED.value, "prediction": None, "dedup": None, "updated_at": utcnow()}})
        counts["reset"] += 1
    counts["kept"] = db.candidates.count_documents({"campaign": cfg.name}) - counts["reset"]
    db.flush()
    return counts


def release_waiting(db: AmdflowDB, name: str) -> int:
    """Release the candidates waiting for a slot (over_budget) into the open round: their relax Fireworks run again
    and take the round's slots best-ranked first (FireWorks' _priority); the rest wait again."""
    lp = db.launchpad
    released = 0
    for cand in db.candidates.find({"campaign": name, "state": CandidateState.OVER_BUDGET.value},
                                   {"_id": 0, "candidate_id": 1, "fw_ids": 1, "funnel": 1}):
        fw_ids = cand.get("fw_ids") or {}
        if "relax" not in fw_ids:
            continue
        lp.rerun_fw(fw_ids["relax"])
        if "analyze" in fw_ids and lp.fireworks.find_one({"fw_id": fw_ids["analyze"], "state": "DEFUSED"}, {"_id": 1}):
            lp.reignite_fw(fw_ids["analyze"])
        back = CandidateState.PRERELAXED if cand.get("funnel") else CandidateState.UNIQUE
        db.candidates.update_one({"candidate_id": cand["candidate_id"], "state": CandidateState.OVER_BUDGET.value},
                                 {"$set": {"state": back.value, "updated_at": utcnow()}})
        released += 1
    db.flush()
    return released
