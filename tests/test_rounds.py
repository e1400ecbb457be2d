"""Active-learning rounds (rounds:): a share of relax.budget per round, closing a round retrains CGCNN on the
campaign's hull and re-ranks the waiting pool, the stop rule, and one clear line for bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amdflow.campaign import RoundsConfig, campaign_from_dict
from amdflow.errors import ConfigError
from amdflow.ops import add_campaign, campaign_status, run_campaign
from amdflow.stages.rounds import (
    RoundError,
    RoundFigures,
    advance,
    next_limit,
    round_figures,
    stop_reason,
)


def test_round_figures_and_the_stop_rule_have_known_answers():
    members = [{"state": "analyzed", "thermo": {"e_above_hull": 0.0}}, {"state": "analyzed", "thermo": {"e_above_hull": 0.03}},
               {"state": "analyzed", "thermo": {"e_above_hull": 0.2}}, {"state": "failed"}]
    f = round_figures(2, members, 0.05, ["AlNi"])
    assert (f.slots, f.relaxed, f.failed, f.hits, f.hit_rate) == (4, 3, 1, 2, 0.6667)
    assert round_figures(1, members, 0.0, []).hits == 1
    cfg = RoundsConfig(size=3, max_rounds=4, min_hit_rate=0.5)
    assert stop_reason(cfg, f, 10, 6, True) is None
    assert "budget of 6 spent" in stop_reason(cfg, f, 6, 6, True)
    assert "max_rounds 4" in stop_reason(cfg, RoundFigures(4, 3, 3, 0, 3, 1.0), None, 12, True)
    assert "hit rate 0.333 fell below min_hit_rate 0.5" in stop_reason(cfg, RoundFigures(1, 3, 3, 0, 1, 0.3333), None, 3, True)
    assert "nothing left to relax" in stop_reason(cfg, f, None, 6, False)
    assert "relaxed nothing" in stop_reason(RoundsConfig(size=3), RoundFigures(3, 0, 0, 0, 0, None), None, 6, True)
    assert next_limit(cfg, 10, 6) == 9 and next_limit(cfg, 7, 6) == 7 and next_limit(cfg, None, 6) == 9


@pytest.mark.parametrize(("rounds", "message"), [
    ({"size": 0}, "key 'rounds.size': Input should be greater than or equal to 1"),
    ({"size": 2, "retrain": ["potential"]}, "rounds.retrain"),
    ({"size": 2, "min_hit_rate": 2}, "key 'rounds.min_hit_rate'"),
])
def test_bad_rounds_settings_are_one_clear_line(binary_campaign_dict, rounds, message):
    with pytest.raises(ConfigError) as err:
        campaign_from_dict({**binary_campaign_dict, "rounds": rounds})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_retraining_with_no_finished_dft_is_one_clear_line(db, binary_campaign_dict):
    cfg = campaign_from_dict({**binary_campaign_dict, "rounds": {"size": 2}})
    add_campaign(db, cfg)
    assert campaign_status(db, cfg.name)["rounds"]["k"] == 1
    from amdflow.stages import load_campaign_config
    from amdflow.stages.rounds import retrain_cgcnn

    stored, doc = load_campaign_config(db, cfg.name)
    with pytest.raises(RoundError) as err:
        retrain_cgcnn(db, stored, doc, 1)
    assert "retraining CGCNN needs finished DFT results and the campaign has 0 relaxed candidates" in str(err.value)
    assert "rounds.retrain: []" in str(err.value) and "\n" not in str(err.value)


def test_the_rounds_are_not_part_of_the_settings_hash(binary_campaign_dict):
    a = campaign_from_dict(binary_campaign_dict)
    assert a.config_hash() == campaign_from_dict({**binary_campaign_dict, "rounds": {"size": 4}}).config_hash()


def _rounds_campaign(binary_campaign_dict, budget=2, size=1):
    return campaign_from_dict({**binary_campaign_dict, "relax": {**binary_campaign_dict["relax"], "budget": budget},
                               "rounds": {"size": size, "epochs": 3, "patience": 2}})


@pytest.mark.slow
def test_two_rounds_end_to_end_retrain_and_stop_within_the_budget(db, lpad, binary_campaign_dict, tmp_path):
    """relax.budget 2 in rounds of 1: `amdflow run` relaxes the best-ranked candidate, closes round 1 (CGCNN fine-tuned
    on the campaign's hull, adopted only if it beats the one in use on held-out materials), relaxes round 2's and stops:
    budget spent (no retraining after the last round). Every candidate and task records its round; the round's
    checkpoint is kept with its sha256."""
    from amdflow.screen.checkpoint import file_sha256, load_checkpoint

    cfg = _rounds_campaign(binary_campaign_dict)
    add_campaign(db, cfg)
    os.chdir(tmp_path)
    report = run_campaign(db, cfg)
    doc = db.campaigns.find_one({"name": cfg.name})
    assert [r["k"] for r in doc["rounds"]] == [1, 2] and doc["round"]["state"] == "stopped"
    assert "relax.budget of 2 spent" in doc["round"]["stop_reason"] and doc["budget_used"] == 2
    assert [r["k"] for r in report.rounds_closed] == [1, 2]
    relaxed = list(db.candidates.find({"campaign": cfg.name, "state": "analyzed"}))
    assert sorted(c["round"] for c in relaxed) == [1, 2]
    for c in relaxed:
        assert db.tasks.find_one({"task_id": c["task_id"]})["round"] == c["round"]
    assert db.tasks.count_documents({"kind": "candidate", "level": "final"}) == 2  # nothing relaxed twice
    first, second = doc["rounds"]
    path = Path(first["checkpoint"])
    assert path.exists() and path.with_suffix(".json").exists() and file_sha256(path) == first["checkpoint_sha256"]
    assert first["relaxed"] == 1 and first["train_metrics"]["epochs_run"] >= 1 and "validation MAE" in first["why"]
    assert second["checkpoint"] is None and second["stop_reason"] == doc["round"]["stop_reason"]
    (r2,) = [c for c in relaxed if c["round"] == 2]
    in_use = first["checkpoint_sha256"] if first["adopted"] else load_checkpoint("formation-energy-per-atom").model_id
    assert r2["prediction"]["model_id"] == in_use  # round 2 was ranked by whatever round 1 left in use
    assert first["adopted"] == (doc.get("screen_checkpoint") == first["checkpoint"])
    rows = campaign_status(db, cfg.name)["rounds"]
    assert rows["state"] == "stopped" and len(rows["history"]) == 2


@pytest.mark.slow
def test_an_adopted_checkpoint_reranks_the_over_budget_pool(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    """The waiting pool (over_budget: its relax Fireworks COMPLETED, the rest defused) is predicted again with round
    1's CGCNN when it is adopted; the relax Fireworks' priorities follow the new predictions, and round 2's slot goes
    to the best of the new ranking."""
    import amdflow.screen.train as training

    real = training.train

    def better(*args, **kwargs):  # the fine-tuned model "wins" on held-out data: adopted
        result = real(*args, **kwargs)
        result.metrics["val_mae"] = result.metrics["parent_val_mae"] * 0.5
        return result

    monkeypatch.setattr(training, "train", better)
    cfg = _rounds_campaign({**binary_campaign_dict, "screen": {"max_formation_energy_per_atom": 3.0}})
    add_campaign(db, cfg)
    os.chdir(tmp_path)

    run_campaign(db, cfg, max_fireworks=None)
    doc = db.campaigns.find_one({"name": cfg.name})
    first = doc["rounds"][0]
    assert first["adopted"] and first["pool_reranked"] >= 2 and doc["screen_checkpoint"] == first["checkpoint"]
    sha = first["checkpoint_sha256"]
    relaxed = {c["round"]: c for c in db.candidates.find({"campaign": cfg.name, "state": "analyzed"})}
    assert relaxed[2]["prediction"]["model_id"] == sha
    # round 2's slot went to the best candidate of the new ranking among those that reached the relax stage
    reached = [c for c in db.candidates.find({"campaign": cfg.name, "state": {"$in": ["analyzed", "over_budget"]}})
               if c.get("round") != 1]
    assert all(c["prediction"]["model_id"] == sha for c in reached)
    best = min(reached, key=lambda c: c["prediction"]["formation_energy_per_atom"])
    assert best["candidate_id"] == relaxed[2]["candidate_id"]
    for c in reached:
        if c["state"] == "over_budget":
            fw = lpad.fireworks.find_one({"fw_id": c["fw_ids"]["relax"]})
            assert fw["spec"]["_priority"] == pytest.approx(-c["prediction"]["formation_energy_per_atom"], abs=1e-6)
    assert advance(db, cfg.name)["closed"] is None  # stopped: nothing more to close
