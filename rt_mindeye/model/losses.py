"""MindEye2's training losses as pure functions (written from the paper's and MindEyeV2 ``utils.py``'s definitions).

- BiMixCo (first third of training): voxels of half the batch are mixed with a shuffled partner with a weight drawn
  from Beta(0.15, 0.15); the contrastive targets are mixed the same way (soft labels), in both directions, at
  temperature 0.006.
- SoftCLIP (the rest): soft targets from the image-image similarity (CLIP-CLIP), both directions, temperature annealed
  with a cosine from 0.004 to 0.0075 over the SoftCLIP epochs.
- soft_cont_loss: the same soft-target contrastive loss between the auxiliary low-level tokens and image features.

All embeddings are flattened and L2-normalised before these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mixco(voxels: torch.Tensor, generator: torch.Generator, beta: float = 0.15, prob: float = 0.5
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix a random subset of the batch with shuffled partners.

    Returns (mixed voxels, perm, betas, select): row i of the result is ``betas[i] * v[i] + (1 - betas[i]) * v[perm[i]]``
    for selected rows; unselected rows keep ``betas[i] = 1``. Randomness comes only from ``generator``.
    """
    n = voxels.shape[0]
    perm = torch.randperm(n, generator=generator)
    # Beta(a, a) as X / (X + Y) with X, Y ~ Gamma(a): torch.distributions cannot take a generator.
    x = torch._standard_gamma(torch.full((n,), beta), generator=generator)
    y = torch._standard_gamma(torch.full((n,), beta), generator=generator)
    betas = (x / (x + y).clamp_min(1e-12)).nan_to_num(0.5)
    select = torch.rand(n, generator=generator) <= prob
    betas = torch.where(select, betas, torch.ones_like(betas))
    shape = (-1,) + (1,) * (voxels.ndim - 1)
    b = betas.to(voxels.device, voxels.dtype).reshape(shape)
    mixed = voxels * b + voxels[perm.to(voxels.device)] * (1 - b)
    return mixed, perm, betas, select


def mixco_nce(preds: torch.Tensor, targets: torch.Tensor, temp: float, perm: torch.Tensor,
              betas: torch.Tensor) -> torch.Tensor:
    """Bidirectional contrastive loss with the soft labels of a MixCo batch."""
    logits = preds @ targets.T / temp
    n = preds.shape[0]
    labels = torch.diag(betas.to(logits.dtype)).to(logits.device)
    labels[torch.arange(n, device=logits.device), perm.to(logits.device)] += 1 - betas.to(logits.device, logits.dtype)
    # Rows whose partner is themselves (perm[i] == i) get 1 in total, as intended.
    forward = -(logits.log_softmax(-1) * labels).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * labels.T).sum(-1).mean()
    return (forward + backward) / 2


def soft_clip_loss(preds: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """Bidirectional contrastive loss with soft targets from the target-target similarity."""
    soft = (targets @ targets.T / temp).softmax(-1)
    logits = preds @ targets.T / temp
    forward = -(logits.log_softmax(-1) * soft).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * soft).sum(-1).mean()
    return (forward + backward) / 2


def soft_cont_loss(student: torch.Tensor, teacher: torch.Tensor, teacher_aug: torch.Tensor,
                   temp: float) -> torch.Tensor:
    """Soft-target contrastive loss of student features against (augmented) teacher features."""
    teacher_soft = (teacher @ teacher_aug.T / temp).softmax(-1)
    teacher_soft_t = (teacher_aug @ teacher.T / temp).softmax(-1)
    forward = -((student @ teacher_aug.T / temp).log_softmax(-1) * teacher_soft).sum(-1).mean()
    backward = -((teacher_aug @ student.T / temp).log_softmax(-1) * teacher_soft_t).sum(-1).mean()
    return (forward + backward) / 2


def soft_clip_temperature(epoch_in_phase: int, phase_epochs: int, start: float = 0.004, end: float = 0.0075) -> float:
    """Cosine annealing from ``start`` (first SoftCLIP epoch) to ``end`` (last)."""
    if phase_epochs <= 1:
        return start
    return end + (start - end) / 2 * (1 + math.cos(math.pi * epoch_in_phase / (phase_epochs - 1)))


def flat_normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).float(), dim=-1)


def top1_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose most similar target (cosine on flattened embeddings) is their own."""
    sim = flat_normalized(preds) @ flat_normalized(targets).T
    return (sim.argmax(dim=1) == torch.arange(sim.shape[0], device=sim.device)).float().mean().item()
