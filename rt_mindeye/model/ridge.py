"""Per-subject linear maps from a subject's voxels into the shared latent space.

MindEye2 calls this "ridge regression": one ``nn.Linear(n_voxels_subject, hidden)`` per subject whose L2 penalty is the
optimiser's weight decay (AdamW, 1e-2). Everything after it is shared across subjects, which is what lets a new
subject be fitted from one hour of data: only this head starts from scratch.

State-dict keys: ``linears.{i}.weight`` [hidden, n_voxels_i] and ``linears.{i}.bias`` [hidden].
"""

from __future__ import annotations

import torch
from torch import nn


class RidgeHeads(nn.Module):
    """One linear head per subject; ``forward(voxels, subject_index)`` -> (batch, 1, hidden)."""

    def __init__(self, subject_voxels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        self.subject_voxels = tuple(int(v) for v in subject_voxels)
        self.hidden_dim = int(hidden_dim)
        self.linears = nn.ModuleList([nn.Linear(n, self.hidden_dim) for n in self.subject_voxels])

    def forward(self, voxels: torch.Tensor, subject_index: int) -> torch.Tensor:
        if not 0 <= subject_index < len(self.linears):
            raise IndexError(f"subject index {subject_index} out of range: the model has {len(self.linears)} "
                             "ridge heads")
        if voxels.ndim == 3:  # (batch, 1, voxels) as MindEye2's data loaders give it
            voxels = voxels[:, 0]
        expected = self.subject_voxels[subject_index]
        if voxels.ndim != 2 or voxels.shape[-1] != expected:
            raise ValueError(f"ridge head {subject_index} expects (batch, {expected}) voxels, "
                             f"got {tuple(voxels.shape)}")
        return self.linears[subject_index](voxels).unsqueeze(1)
