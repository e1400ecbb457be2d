from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pymatgen.core import Structure

from amdflow.campaign import campaign_from_dict
from amdflow.errors import AmdflowError
from amdflow.generate import generate_candidates
from amdflow.screen.checkpoint import load_checkpoint
from amdflow.screen.featurize import crystal_graph
from amdflow.screen.predict import CGCNNPredictor, get_predictor
from amdflow.screen.train import (
    TrainSettings,
    data_hash,
    read_targets_csv,
    save_checkpoint,
    split_indices,
    train,
)


@pytest.fixture(scope="module")
def structures():
    cfg = campaign_from_dict({"name": "t", "elements": ["Fe", "Al", "Ni", "Co"],
                              "templates": [{"source": "aflow", "max_sites": 6}], "generate": {"lattice_scales": [0.97, 1.03]}})
    return [Structure.from_dict(d["structure"]) for d in generate_candidates(cfg)][:80]


def test_split_is_seeded_and_complete():
    a = split_indices(100, (0.8, 0.1, 0.1), seed=1)
    assert a == split_indices(100, (0.8, 0.1, 0.1), seed=1) != split_indices(100, (0.8, 0.1, 0.1), seed=2)
    assert [len(x) for x in a] == [80, 10, 10]
    assert sorted(a[0] + a[1] + a[2]) == list(range(100))
    with pytest.raises(AmdflowError, match="at least 3"):
        split_indices(2, (0.8, 0.1, 0.1), 0)


def test_targets_csv(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("id,formation_energy\nmp-1,-0.5\nmp-2, 0.25\n")
    assert read_targets_csv(p) == {"mp-1": -0.5, "mp-2": 0.25}
    p.write_text("mp-1,-0.5\nmp-2,abc\n")
    with pytest.raises(AmdflowError, match="line 2"):
        read_targets_csv(p)


def test_fine_tune_learns_an_offset_and_saves_the_original_format(structures, tmp_path):
    graphs = [crystal_graph(s) for s in structures]
    parent = load_checkpoint("formation-energy-per-atom")
    targets = get_predictor().predict_graphs(graphs) + 0.5  # the parent is off by exactly 0.5 eV/atom
    settings = TrainSettings(epochs=12, patience=12, batch_size=16, learning_rate=2e-3, seed=3)
    result = train(graphs, targets, parent, settings)
    assert result.metrics["parent_test_mae"] == pytest.approx(0.5, abs=1e-4)
    assert result.metrics["test_mae"] < 0.25
    tr = result.split["train"]
    assert result.normalizer_mean == pytest.approx(float(np.mean(targets[tr])))  # refit on the training split
    ids = [f"s{i}" for i in range(len(graphs))]
    path, meta_path = save_checkpoint(result, tmp_path / "ft.pth.tar", settings, parent, ids, data_hash(ids, targets, graphs), "test")
    assert path.read_bytes()[:2] != b"PK"  # legacy (non-zip) serialization, like the original checkpoints
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "best_mae_error", "optimizer", "normalizer", "args"}
    loaded = load_checkpoint(str(path))
    assert loaded.architecture == parent.architecture
    again = CGCNNPredictor(loaded).predict_graphs(graphs)
    assert np.abs(again - targets)[result.split["test"]].mean() == pytest.approx(result.metrics["test_mae"], abs=1e-5)
    meta = json.loads(meta_path.read_text())
    assert meta["parent"]["sha256"] == parent.model_id and meta["sha256"] == loaded.model_id
    assert meta["split_sizes"] == {"train": len(tr), "val": len(result.split["val"]), "test": len(result.split["test"])}
    assert meta["data_hash"] == data_hash(ids, targets, graphs) != data_hash(ids, targets + 0.1, graphs)


def test_train_cli_on_a_folder(structures, tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    lines = ["id,target"]
    for i, s in enumerate(structures[:30]):
        s.to(filename=str(folder / f"x{i}.cif"))
        lines.append(f"x{i},{-0.1 * (i % 5)}")
    lines.append("missing-one,0.3")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "amdflow", "train", "--cifs", str(folder), "--targets", str(tmp_path / "t.csv"),
                           "--out", str(tmp_path / "m.pth.tar"), "--epochs", "2", "--workers", "1"],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "AMDFLOW_PROGRESS": "false"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["checkpoint"].endswith("m.pth.tar") and "parent_test_mae" in out
    assert "1 ids in" in proc.stderr and "missing-one" in proc.stderr
    assert load_checkpoint(out["checkpoint"]).architecture.n_conv == 4
    bad = subprocess.run([sys.executable, "-m", "amdflow", "train", "--cifs", str(folder)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--targets" in bad.stderr
