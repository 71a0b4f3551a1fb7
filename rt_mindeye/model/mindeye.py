"""``MindEyeModule``: ridge heads + shared backbone + diffusion prior, with MindEye2's state-dict layout.

The three parts are registered in the published order (``ridge``, ``backbone``, ``diffusion_prior``), so
``MindEyeModule(config).state_dict()`` has exactly the keys, shapes and order of the published checkpoints for the
same configuration (checked against ``tests/data/mindeye2_layout`` in the tests).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from rt_mindeye.model.backbone import BrainNetwork
from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.prior import DiffusionPrior
from rt_mindeye.model.ridge import RidgeHeads

PARTS = ("ridge", "backbone", "diffusion_prior")


@dataclass
class MindEyeOutput:
    """Outputs of :meth:`MindEyeModule.forward` for one batch of one subject."""

    tokens: torch.Tensor  # (batch, seq, dim): backbone tokens, the prior's condition
    clip_voxels: torch.Tensor  # (batch, seq, dim): retrieval embedding (compare with image tokens by cosine)
    blurry_latent: torch.Tensor | None = None  # low-level reconstruction target space, when the head exists
    blurry_aux: torch.Tensor | None = None


class MindEyeModule(nn.Module):
    """The MindEye2 model; ``forward(voxels, subject)`` maps one subject's betas to tokens.

    ``subject`` is a ridge-head index or, when the config names its subjects, a subject name.
    """

    def __init__(self, config: MindEyeConfig):
        super().__init__()
        self.config = config
        self.ridge = RidgeHeads(config.subject_voxels, config.hidden_dim)
        self.backbone = BrainNetwork(config)
        if config.use_prior:
            self.diffusion_prior = DiffusionPrior(config)

    def subject_index(self, subject: int | str) -> int:
        if isinstance(subject, str):
            if subject not in self.config.subject_names:
                raise KeyError(f"unknown subject {subject!r}; this model has {list(self.config.subject_names)}")
            return self.config.subject_names.index(subject)
        return int(subject)

    def forward(self, voxels: torch.Tensor, subject: int | str = 0) -> MindEyeOutput:
        hidden = self.ridge(voxels, self.subject_index(subject))
        out = self.backbone(hidden)
        return MindEyeOutput(out.tokens, out.clip_voxels, out.blurry_latent, out.blurry_aux)

    @torch.no_grad()
    def predict_image_tokens(self, voxels: torch.Tensor, subject: int | str = 0, steps: int | None = None,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Backbone tokens -> sampled image tokens (the unCLIP decoder's condition); needs the prior."""
        if not self.config.use_prior:
            raise RuntimeError("this model has no diffusion prior (use_prior=False)")
        out = self.forward(voxels, subject)
        return self.diffusion_prior.sample(out.tokens, steps=steps, generator=generator)

    def autocast(self):
        """The context inference runs in: none for float32 weights; autocast to the weights' half precision
        otherwise, with float32 inputs, so the residual streams and the prior's sample stay float32 and the matrix
        products run in half precision, as MindEye2's inference under ``torch.cuda.amp.autocast(float16)``."""
        weight = self.backbone.backbone_linear.weight
        if weight.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(weight.device.type, dtype=weight.dtype)

    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters per part (shared tensors counted once), as MindEye2's ``count_params`` prints them."""
        counts = {}
        for name in PARTS:
            part = getattr(self, name, None)
            if part is not None:
                counts[name] = sum(p.numel() for p in part.parameters())
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


def build_model(config: MindEyeConfig, device: str | torch.device = "cpu") -> MindEyeModule:
    """Build on ``device``; ``'meta'`` allocates nothing (for shape checks and for loading with ``assign=True``)."""
    with torch.device(device):
        return MindEyeModule(config)
