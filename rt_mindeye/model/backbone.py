"""The shared backbone: MindEye2's mixer blocks, then a linear map to image tokens.

Layout (key names are those of MindEyeV2 ``models.BrainNetwork`` with ``seq_len=1``, so published weights load as-is):

- ``mixer_blocks1.{i}``: LayerNorm(h) -> [Linear(h, h), GELU, Dropout, Linear(h, h)]. In the official forward pass
  (kept here exactly) block i's output plus its input is stored as ``residual1`` and then **overwritten**: the next
  line sets ``x = mixer_blocks2[i](x^T) + residual2``, and ``residual2`` chains from the ridge output, not from
  ``x``. So what ``mixer_blocks1`` computes never reaches the output, its parameters get no gradient, and the
  published ``mixer_blocks1`` weights are untrained initial values (134 M parameters at hidden 4096).
- ``mixer_blocks2.{i}``: the same over the sequence axis. MindEye2 feeds one "sequence" position, so these are
  LayerNorm(1) / Linear(1, 1): a LayerNorm over one element outputs its bias, so each block adds a learned constant.
  So the mixer stage as a whole is the ridge output plus four learned constants (24 parameters), and the backbone's
  capacity is ``backbone_linear`` and the heads. Both block lists are kept so that checkpoints load key-for-key and
  the forward pass stays the published one (``tests/model/test_golden.py`` checks both against the official code).
- ``backbone_linear``: Linear(h, seq * dim), reshaped to (seq, dim) tokens: the input of the diffusion prior.
- ``clip_proj``: per-token [LayerNorm, GELU, Linear] x 3 giving ``clip_voxels``, the retrieval embedding that the
  contrastive loss aligns with the image tokens.
- low-level head (optional): ``blin1`` Linear(h, c*g*g) -> Dropout(0.3) -> (c, g, g) -> ``bnorm`` GroupNorm(1, c);
  ``bupsampler`` (a diffusers VAE ``Decoder``) maps it to the blurry latent (4x28x28 SD-VAE latent in MindEye2), and
  ``b_maps_projector`` (1x1 convs) to g*g auxiliary tokens (49x512, trained against ConvNeXt features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rt_mindeye.model.config import MindEyeConfig


@dataclass
class BackboneOutput:
    """What the backbone computes for a batch."""

    tokens: torch.Tensor  # (batch, seq, dim): the prior's condition
    clip_voxels: torch.Tensor  # (batch, seq, dim): the retrieval embedding
    blurry_latent: torch.Tensor | None = None  # (batch, out_channels, size, size) when the low-level head exists
    blurry_aux: torch.Tensor | None = None  # (batch, grid*grid, aux_dim)


def _mlp(width: int, dropout: float) -> nn.Sequential:
    # Indices 0 and 3 carry the weights (keys `.1.0.` and `.1.3.` inside a mixer block).
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))


def _mixer_block(width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), _mlp(width, dropout))


def _projector(width: int) -> nn.Sequential:
    # Keys clip_proj.{0,3,6} (LayerNorm) and clip_proj.{2,5,8} (Linear).
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width)]
    return nn.Sequential(*layers)


class BrainNetwork(nn.Module):
    """MindEye2's backbone: (batch, 1, hidden) -> tokens, clip_voxels and optionally the low-level outputs.

    The forward pass is the official one, including ``mixer_blocks1``'s discarded output (see the module docstring).
    """

    # The sequence axis MindEye2 uses (one position); mixer_blocks2 is built over it.
    SEQ_LEN = 1

    def __init__(self, config: MindEyeConfig):
        super().__init__()
        self.config = config
        h = config.hidden_dim
        self.mixer_blocks1 = nn.ModuleList([_mixer_block(h, config.backbone_dropout) for _ in range(config.n_blocks)])
        self.mixer_blocks2 = nn.ModuleList(
            [_mixer_block(self.SEQ_LEN, config.backbone_dropout) for _ in range(config.n_blocks)])
        self.backbone_linear = nn.Linear(h * self.SEQ_LEN, config.token_count)
        self.clip_proj = _projector(config.token_dim)
        if config.blurry_recon:
            self._build_low_level_head(config)

    def _build_low_level_head(self, config: MindEyeConfig) -> None:
        # Imported here so that a model without the head does not need diffusers.
        from diffusers.models.autoencoders.vae import Decoder

        c, g = config.blurry_channels, config.blurry_grid
        n_up = len(config.blurry_decoder_channels)
        self.blin1 = nn.Linear(config.hidden_dim * self.SEQ_LEN, c * g * g)
        self.bdropout = nn.Dropout(0.3)
        self.bnorm = nn.GroupNorm(1, c)
        self.bupsampler = Decoder(
            in_channels=c,
            out_channels=config.blurry_out_channels,
            up_block_types=("UpDecoderBlock2D",) * n_up,
            block_out_channels=tuple(config.blurry_decoder_channels),
            layers_per_block=1,
            norm_num_groups=config.blurry_norm_groups,
        )
        aux = config.blurry_aux_dim
        self.b_maps_projector = nn.Sequential(
            nn.Conv2d(c, aux, 1, bias=False), nn.GroupNorm(1, aux), nn.ReLU(True),
            nn.Conv2d(aux, aux, 1, bias=False), nn.GroupNorm(1, aux), nn.ReLU(True),
            nn.Conv2d(aux, aux, 1, bias=True),
        )

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual mixer blocks and the token map: ``(flattened mixer output, tokens)``. Shared by
        :meth:`forward` and by callers that need the retrieval path without the low-level head."""
        if x.ndim == 2:
            x = x.unsqueeze(1)
        residual1 = x
        residual2 = x.transpose(1, 2)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2):
            x = block1(x) + residual1
            residual1 = x
            x = x.transpose(1, 2)
            x = block2(x) + residual2
            residual2 = x
            x = x.transpose(1, 2)
        x = x.reshape(x.shape[0], -1)
        tokens = self.backbone_linear(x).reshape(x.shape[0], self.config.token_seq, self.config.token_dim)
        return x, tokens

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        x, tokens = self.mix(x)
        clip_voxels = self.clip_proj(tokens)
        out = BackboneOutput(tokens=tokens, clip_voxels=clip_voxels)
        if self.config.blurry_recon:
            g = self.config.blurry_grid
            seed = self.bdropout(self.blin1(x)).reshape(x.shape[0], -1, g, g).contiguous()
            seed = self.bnorm(seed)
            out.blurry_aux = self.b_maps_projector(seed).flatten(2).transpose(1, 2)
            out.blurry_latent = self.bupsampler(seed)
        return out
