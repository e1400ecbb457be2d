"""The CGCNN network (inference), with the original's parameter names.

Layer names (``embedding``, ``convs.k.fc_full``, ``bn1``, ``bn2``, ``conv_to_fc``,
``fcs``, ``fc_out``) match the original so its state_dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvLayer(nn.Module):
    """Gated graph convolution of the original CGCNN."""

    def __init__(self, atom_fea_len: int, nbr_fea_len: int) -> None:
        super().__init__()
        self.atom_fea_len = atom_fea_len
        self.fc_full = nn.Linear(2 * atom_fea_len + nbr_fea_len, 2 * atom_fea_len)
        self.bn1 = nn.BatchNorm1d(2 * atom_fea_len)
        self.bn2 = nn.BatchNorm1d(atom_fea_len)

    def forward(self, atom_fea: torch.Tensor, nbr_fea: torch.Tensor, nbr_idx: torch.Tensor) -> torch.Tensor:
        n, m = nbr_idx.shape
        a = self.atom_fea_len
        total = torch.cat([atom_fea.unsqueeze(1).expand(n, m, a), atom_fea[nbr_idx], nbr_fea], dim=2)
        gated = self.bn1(self.fc_full(total).view(-1, 2 * a)).view(n, m, 2 * a)
        nbr_filter, nbr_core = gated.chunk(2, dim=2)
        summed = torch.sum(torch.sigmoid(nbr_filter) * nn.functional.softplus(nbr_core), dim=1)
        return nn.functional.softplus(atom_fea + self.bn2(summed))


class CGCNN(nn.Module):
    """Crystal graph convolutional network; ``forward`` takes a batch of crystals."""

    def __init__(self, orig_atom_fea_len: int, nbr_fea_len: int, atom_fea_len: int = 64, n_conv: int = 3,
                 h_fea_len: int = 128, n_h: int = 1, n_out: int = 1) -> None:
        super().__init__()
        self.classification = n_out == 2
        self.embedding = nn.Linear(orig_atom_fea_len, atom_fea_len)
        self.convs = nn.ModuleList(ConvLayer(atom_fea_len, nbr_fea_len) for _ in range(n_conv))
        self.conv_to_fc = nn.Linear(atom_fea_len, h_fea_len)
        self.fcs = nn.ModuleList(nn.Linear(h_fea_len, h_fea_len) for _ in range(n_h - 1))
        self.fc_out = nn.Linear(h_fea_len, n_out)

    def forward(self, atom_fea: torch.Tensor, nbr_fea: torch.Tensor, nbr_idx: torch.Tensor,
                crystal_idx: torch.Tensor, n_crystals: int) -> torch.Tensor:
        """Atoms of all crystals concatenated; ``crystal_idx[i]`` is atom i's crystal."""
        softplus = nn.functional.softplus
        x = self.embedding(atom_fea)
        for conv in self.convs:
            x = conv(x, nbr_fea, nbr_idx)
        pooled = torch.zeros(n_crystals, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, crystal_idx, x)
        counts = torch.bincount(crystal_idx, minlength=n_crystals).clamp(min=1).to(x.dtype)
        crys = softplus(self.conv_to_fc(softplus(pooled / counts.unsqueeze(1))))
        for fc in self.fcs:
            crys = softplus(fc(crys))
        out = self.fc_out(crys)
        return nn.functional.log_softmax(out, dim=1) if self.classification else out
