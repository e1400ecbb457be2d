"""Fine-tune (or train from scratch) a CGCNN on a campaign's own results.

The pretrained formation-energy model is too negative for unstable structures (MAE
0.19-0.20 eV/atom on newer MP data); fine-tuning on the DFT (or stand-in) energies a
campaign has computed is the fix. Pure: graphs and targets in, a trained state and
metrics out. The checkpoint is written in the ORIGINAL CGCNN format (legacy torch
serialization; state_dict, normalizer, args, epoch, best_mae_error, optimizer), so the
original code, cgcnn2 and amdflow all load it; a JSON file beside it holds the
provenance (data hash, split, metrics, parent checkpoint).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from amdflow.errors import AmdflowError
from amdflow.screen.checkpoint import Architecture, Checkpoint, file_sha256
from amdflow.screen.featurize import CrystalGraph
from amdflow.screen.predict import collate


@dataclass
class TrainSettings:
    """Training options (energies in the target's unit, eV/atom for formation energy)."""

    epochs: int = 200
    patience: int = 25  # epochs without a better validation MAE before stopping
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test
    seed: int = 42
    # architecture when training from scratch (the original's defaults)
    atom_fea_len: int = 64
    n_conv: int = 3
    h_fea_len: int = 128
    n_h: int = 1


@dataclass
class TrainResult:
    """A trained model and how it did."""

    state_dict: dict[str, Any]
    normalizer_mean: float
    normalizer_std: float
    architecture: Architecture
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    split: dict[str, list[int]]
    history: list[dict[str, float]] = field(default_factory=list)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Seeded random split into train / validation / test index lists."""
    if n < 3:
        raise AmdflowError(f"only {n} structures with targets: training needs at least 3 (better hundreds)")
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise AmdflowError(f"split fractions {tuple(fractions)} must be non-negative and sum to 1")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_val - n_test
    return sorted(order[:n_train]), sorted(order[n_train : n_train + n_val]), sorted(order[n_train + n_val :])


def data_hash(ids: Sequence[str], targets: Sequence[float], graphs: Sequence[CrystalGraph]) -> str:
    """sha256 over (id, target, graph) in id order: the identity of a training set."""
    digest = hashlib.sha256()
    for i in sorted(range(len(ids)), key=lambda k: ids[k]):
        g = graphs[i]
        digest.update(f"{ids[i]}|{targets[i]:.8f}|".encode())
        digest.update(g.atomic_numbers.tobytes() + g.nbr_idx.tobytes() + np.round(g.nbr_dist, 6).tobytes())
    return digest.hexdigest()


def _mae(model: Any, graphs: Sequence[CrystalGraph], targets: np.ndarray, mean: float, std: float, batch: int = 256) -> float:
    import torch

    model.eval()
    errors = []
    with torch.inference_mode():
        for s in range(0, len(graphs), batch):
            out = model(*collate(graphs[s : s + batch]))[:, 0].double().numpy() * std + mean
            errors.append(np.abs(out - targets[s : s + batch]))
    return float(np.concatenate(errors).mean()) if errors else float("nan")


def train(graphs: Sequence[CrystalGraph], targets: Sequence[float], parent: Checkpoint | None,
          settings: TrainSettings, log: Any = None) -> TrainResult:
    """Fine-tune ``parent`` (or train from scratch) with early stopping on validation MAE."""
    import torch

    from amdflow.screen.model import CGCNN

    y = np.asarray(targets, dtype=float)
    if len(graphs) != len(y):
        raise AmdflowError(f"{len(graphs)} structures but {len(y)} targets")
    if not np.isfinite(y).all():
        raise AmdflowError("some targets are not finite numbers: fix the targets file")
    torch.manual_seed(settings.seed)
    tr, va, te = split_indices(len(graphs), settings.fractions, settings.seed)
    mean, std = float(y[tr].mean()), float(y[tr].std()) or 1.0  # normalizer refit on the training split
    if parent is not None:
        if parent.is_classification:
            raise AmdflowError(f"checkpoint {parent.name} is a classifier: fine-tune a regression checkpoint")
        arch = parent.architecture
    else:
        arch = Architecture(92, 41, settings.atom_fea_len, settings.n_conv, settings.h_fea_len, settings.n_h, 1)
    model = CGCNN(arch.orig_atom_fea_len, arch.nbr_fea_len, arch.atom_fea_len, arch.n_conv, arch.h_fea_len, arch.n_h, arch.n_out)
    if parent is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in parent.state_dict.items()}, strict=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    g = [graphs[i] for i in range(len(graphs))]
    train_g, val_g, test_g = [g[i] for i in tr], [g[i] for i in va], [g[i] for i in te]
    y_norm = torch.as_tensor((y - mean) / std, dtype=torch.float32)
    metrics: dict[str, float] = {}
    if parent is not None:
        metrics["parent_test_mae"] = _mae(model, test_g, y[te], parent.normalizer_mean, parent.normalizer_std)
        metrics["parent_val_mae"] = _mae(model, val_g, y[va], parent.normalizer_mean, parent.normalizer_std)
    rng = np.random.default_rng(settings.seed)
    best_state, best_val, best_epoch, history = copy.deepcopy(model.state_dict()), math.inf, 0, []
    epoch = 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        start = time.perf_counter()
        order = rng.permutation(len(tr))
        for s in range(0, len(order), settings.batch_size):
            idx = [tr[k] for k in order[s : s + settings.batch_size]]
            if len(idx) < 2:
                continue  # batch norm needs two crystals' atoms at least
            pred = model(*collate([g[i] for i in idx]))[:, 0]
            loss = torch.nn.functional.mse_loss(pred, y_norm[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_mae = _mae(model, val_g, y[va], mean, std)
        history.append({"epoch": epoch, "val_mae": val_mae, "seconds": time.perf_counter() - start})
        if log:
            log(epoch, settings.epochs, val_mae)
        if val_mae < best_val:
            best_val, best_epoch, best_state = val_mae, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    metrics.update({
        "train_mae": _mae(model, train_g, y[tr], mean, std),
        "val_mae": best_val,
        "test_mae": _mae(model, test_g, y[te], mean, std),
    })
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return TrainResult(state, mean, std, arch, best_epoch, epoch, metrics, {"train": tr, "val": va, "test": te}, history)


def save_checkpoint(result: TrainResult, path: Path, settings: TrainSettings, parent: Checkpoint | None,
                    ids: Sequence[str], hash_of_data: str, source: str) -> tuple[Path, Path]:
    """Write the checkpoint (original format) and its metadata JSON; returns both paths."""
    import torch

    from amdflow import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = result.architecture
    args = {"task": "regression", "atom_fea_len": arch.atom_fea_len, "n_conv": arch.n_conv, "h_fea_len": arch.h_fea_len,
            "n_h": arch.n_h, "lr": settings.learning_rate, "epochs": settings.epochs, "batch_size": settings.batch_size,
            "optim": "Adam", "weight_decay": settings.weight_decay, "train_size": len(result.split["train"]),
            "val_size": len(result.split["val"]), "test_size": len(result.split["test"])}
    payload = {
        "epoch": result.best_epoch,
        "state_dict": result.state_dict,
        "best_mae_error": torch.tensor(result.metrics["val_mae"]),
        "optimizer": {},
        "normalizer": {"mean": torch.tensor(result.normalizer_mean), "std": torch.tensor(result.normalizer_std)},
        "args": args,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp, _use_new_zipfile_serialization=False)  # the original's legacy format
    tmp.replace(path)
    meta = {
        "checkpoint": path.name, "sha256": file_sha256(path), "created": datetime.now(UTC).isoformat(),
        "amdflow_version": __version__, "source": source, "data_hash": hash_of_data, "n_structures": len(ids),
        "split_sizes": {k: len(v) for k, v in result.split.items()}, "test_ids": [ids[i] for i in result.split["test"]],
        "seed": settings.seed, "settings": asdict(settings), "metrics": result.metrics,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "normalizer": {"mean": result.normalizer_mean, "std": result.normalizer_std},
        "parent": None if parent is None else {"name": parent.name, "sha256": parent.model_id, "path": str(parent.path)},
    }
    meta_path = path.with_name(path.name.removesuffix(".pth.tar") + ".json")
    meta_path.write_text(json.dumps(meta, indent=1))
    return path, meta_path


def read_targets_csv(path: Path) -> dict[str, float]:
    """id -> target from a CSV like CGCNN's id_prop.csv (first column id, second target; a header is allowed)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise AmdflowError(f"targets file {path} not found: give a CSV of id,target (like CGCNN's id_prop.csv)")
    out: dict[str, float] = {}
    with open(path, newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row or not row[0].strip():
                continue
            try:
                out[row[0].strip()] = float(row[1])
            except (IndexError, ValueError):
                if n == 1:
                    continue  # a header line
                raise AmdflowError(f"{path}, line {n}: expected 'id,target' with a number, got {row[:2]}") from None
    if not out:
        raise AmdflowError(f"{path} holds no 'id,target' rows")
    return out


def folder_dataset(cif_dir: Path, targets_csv: Path) -> tuple[list[str], list[Path], list[float], list[str]]:
    """(ids, files, targets, ids in the CSV without a structure file) for a CIF folder + targets CSV."""
    cif_dir = Path(cif_dir)
    if not cif_dir.is_dir():
        raise AmdflowError(f"structure folder {cif_dir} not found")
    targets = read_targets_csv(targets_csv)
    files = {p.stem: p for p in cif_dir.rglob("*.cif")}
    ids = sorted(i for i in targets if i in files)
    missing = sorted(i for i in targets if i not in files)
    if not ids:
        raise AmdflowError(f"none of the {len(targets)} ids in {targets_csv} has a <id>.cif in {cif_dir}")
    return ids, [files[i] for i in ids], [targets[i] for i in ids], missing
