"""Batched CGCNN prediction: structures -> graphs -> one forward pass per batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Structure

from amdflow.errors import CheckpointError
from amdflow.screen.checkpoint import Checkpoint, load_checkpoint
from amdflow.screen.featurize import (
    CrystalGraph,
    atom_feature_table,
    crystal_graph,
    gaussian_expand,
)


@dataclass
class CGCNNPredictor:
    """A loaded model on a device; ``predict`` returns de-normalized targets."""

    checkpoint: Checkpoint
    device: str = "cpu"

    def __post_init__(self) -> None:
        import torch

        from amdflow.screen.model import CGCNN

        arch = self.checkpoint.architecture
        if arch.orig_atom_fea_len != 92 or arch.nbr_fea_len != 41:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} expects {arch.orig_atom_fea_len} atom and "
                f"{arch.nbr_fea_len} bond features; amdflow's graphs have 92 and 41 (original CGCNN): "
                "use a checkpoint trained with the original featurization"
            )
        model = CGCNN(arch.orig_atom_fea_len, arch.nbr_fea_len, arch.atom_fea_len, arch.n_conv,
                      arch.h_fea_len, arch.n_h, arch.n_out)
        sd = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in self.checkpoint.state_dict.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} does not match the CGCNN architecture "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]}): use an original-format CGCNN checkpoint"
            )
        self.model = model.to(self.device).eval()

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    def predict_graphs(self, graphs: Sequence[CrystalGraph], batch_size: int = 256) -> np.ndarray:
        """Predictions (eV/atom for the formation-energy model) for prepared graphs."""
        import torch

        table = atom_feature_table()
        out = np.empty(len(graphs))
        with torch.inference_mode():
            for start in range(0, len(graphs), batch_size):
                batch = graphs[start : start + batch_size]
                offsets = np.cumsum([0] + [g.n_atoms for g in batch[:-1]])
                atom_fea = np.concatenate([table[g.atomic_numbers] for g in batch])
                nbr_idx = np.concatenate([g.nbr_idx + off for g, off in zip(batch, offsets, strict=True)])
                nbr_fea = gaussian_expand(np.concatenate([g.nbr_dist for g in batch]))
                crystal_idx = np.repeat(np.arange(len(batch)), [g.n_atoms for g in batch])
                dev = self.device
                pred = self.model(
                    torch.as_tensor(atom_fea, dtype=torch.float32, device=dev),
                    torch.as_tensor(nbr_fea, dtype=torch.float32, device=dev),
                    torch.as_tensor(nbr_idx, device=dev),
                    torch.as_tensor(crystal_idx, device=dev),
                    len(batch),
                )
                if self.checkpoint.is_classification:
                    values = torch.exp(pred[:, 1])  # probability of class 1
                else:
                    values = pred[:, 0] * self.checkpoint.normalizer_std + self.checkpoint.normalizer_mean
                out[start : start + len(batch)] = values.double().cpu().numpy()
        return out

    def predict(self, structures: Sequence[Structure], batch_size: int = 256) -> np.ndarray:
        """Predictions for pymatgen structures."""
        return self.predict_graphs([crystal_graph(s) for s in structures], batch_size=batch_size)


@lru_cache(maxsize=4)
def get_predictor(checkpoint: str = "formation-energy-per-atom", device: str = "cpu") -> CGCNNPredictor:
    """A cached predictor per (checkpoint, device) in this process."""
    return CGCNNPredictor(load_checkpoint(checkpoint), device=device)
