"""Configuration of the MindEye2 shared-subject model.

One frozen dataclass describes the whole architecture; every module's constructor reads the fields it needs, so the
configuration saved next to a checkpoint (``MindEyeConfig.to_dict``) is enough to rebuild the model (the diffusers
rule "constructor arguments are the saved config"). :func:`rt_mindeye.convert.mindeye2.infer_config` recovers it
from a published checkpoint's tensor shapes.

Three presets: ``full`` (the paper's model: hidden 4096, 256x1664 tokens, low-level head), ``light``
(``multisubject_subj01_1024hid_nolow_300ep``: hidden 1024, no low-level head; what the 3T real-time work used) and
``tiny`` (CPU tests and the phantom: small hidden size, the phantom image embedder's tokens, a 2-layer prior).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from rt_mindeye.config import from_mapping, setting, to_mapping

PRESETS = ("full", "light", "tiny")


@dataclass(frozen=True)
class MindEyeConfig:
    """Architecture of :class:`~rt_mindeye.model.mindeye.MindEyeModule` (shapes only, no training settings)."""

    subject_voxels: tuple[int, ...] = setting((15724,), "voxels of each subject, in ridge-head order (ridge.linears.i)")
    subject_names: tuple[str, ...] = setting((), "optional label per ridge head (e.g. 'subj02'); empty = unnamed")
    hidden_dim: int = setting(1024, "width of the ridge output and of the residual MLP backbone", min=1)
    n_blocks: int = setting(4, "residual MLP blocks in the backbone", min=1)
    token_seq: int = setting(256, "image tokens per trial (OpenCLIP ViT-bigG/14: 256 patches)", min=1)
    token_dim: int = setting(1664, "width of one image token (ViT-bigG/14: 1664)", min=2)
    backbone_dropout: float = setting(0.15, "dropout inside the backbone's residual blocks", min=0.0, max=1.0)
    blurry_recon: bool = setting(False, "build the low-level head (blurry SD-VAE latent + 49-token auxiliary head)")
    blurry_channels: int = setting(64, "channels of the low-level head's 7x7 seed map (blin1 = channels*grid^2)", min=1)
    blurry_grid: int = setting(7, "side of the low-level head's seed map; the aux head gives grid^2 tokens", min=1)
    blurry_out_channels: int = setting(4, "channels of the low-level output (4 = SD-VAE latent, 3 = RGB)", min=1)
    blurry_decoder_channels: tuple[int, ...] = setting((32, 64, 128), "diffusers Decoder block_out_channels")
    blurry_norm_groups: int = setting(32, "GroupNorm groups inside the low-level decoder", min=1)
    blurry_aux_dim: int = setting(512, "width of the auxiliary low-level tokens (ConvNeXt features in MindEye2)", min=1)
    use_prior: bool = setting(True, "build the diffusion prior (backbone tokens -> image tokens)")
    prior_depth: int = setting(6, "transformer layers in the prior", min=1)
    prior_dim_head: int = setting(52, "width of one attention head in the prior", min=2)
    prior_heads: int = setting(32, "attention heads in the prior", min=1)
    prior_ff_mult: int = setting(4, "feed-forward expansion in the prior (SwiGLU)", min=1)
    prior_timesteps: int = setting(100, "diffusion timesteps of the prior's cosine schedule", min=2)
    prior_cond_drop_prob: float = setting(0.2, "probability of dropping each condition in training", min=0.0, max=1.0)
    prior_sample_steps: int = setting(20, "DDIM steps when sampling the prior", min=1)

    def __post_init__(self):
        # Frozen dataclass: normalise list inputs (YAML, JSON) to tuples so configs compare and hash.
        for name in ("subject_voxels", "subject_names", "blurry_decoder_channels"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not self.subject_voxels:
            raise ValueError("subject_voxels must name at least one subject")
        if any(int(v) < 1 for v in self.subject_voxels):
            raise ValueError(f"subject_voxels must be positive, got {self.subject_voxels}")
        if self.subject_names and len(self.subject_names) != len(self.subject_voxels):
            raise ValueError(f"subject_names has {len(self.subject_names)} entries for "
                             f"{len(self.subject_voxels)} subjects")
        if self.blurry_recon:
            if len(self.blurry_decoder_channels) < 1:
                raise ValueError("blurry_decoder_channels needs at least one block")
            bad = [c for c in self.blurry_decoder_channels if c % self.blurry_norm_groups]
            if bad:
                raise ValueError(f"blurry_decoder_channels {self.blurry_decoder_channels} must be multiples of "
                                 f"blurry_norm_groups {self.blurry_norm_groups}")
        if self.use_prior and self.prior_dim_head % 2:
            raise ValueError(f"prior_dim_head must be even (rotary embedding), got {self.prior_dim_head}")

    # -- derived sizes ---------------------------------------------------------------------------------------------

    @property
    def n_subjects(self) -> int:
        return len(self.subject_voxels)

    @property
    def token_count(self) -> int:
        """Numbers in one flattened token map (backbone_linear's output size)."""
        return self.token_seq * self.token_dim

    @property
    def blurry_size(self) -> int:
        """Side of the low-level output: the decoder doubles the seed map once per block but the last."""
        return self.blurry_grid * 2 ** (len(self.blurry_decoder_channels) - 1)

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, subject_voxels: tuple[int, ...] | list[int], **overrides: Any) -> "MindEyeConfig":
        """``full``, ``light`` or ``tiny`` for the given subjects; ``overrides`` replace single fields."""
        if name == "full":
            base = dict(hidden_dim=4096, blurry_recon=True)
        elif name == "light":
            base = dict(hidden_dim=1024, blurry_recon=False)
        elif name == "tiny":
            base = dict(hidden_dim=128, n_blocks=2, token_seq=16, token_dim=64, blurry_recon=True,
                        blurry_channels=16, blurry_out_channels=3, blurry_decoder_channels=(8, 16, 32),
                        blurry_norm_groups=8, blurry_aux_dim=32, prior_depth=2, prior_dim_head=16,
                        prior_heads=4, prior_ff_mult=2)
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
        base.update(overrides)
        return cls(subject_voxels=tuple(int(v) for v in subject_voxels), **base)

    def replace(self, **changes: Any) -> "MindEyeConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON/YAML-ready data (tuples become lists)."""
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "MindEyeConfig":
        """Validated inverse of :meth:`to_dict` (unknown keys and bad values raise ConfigError)."""
        return from_mapping(cls, data, source=source, prefix="model")


def tiny_fields_for(token_dim: int, blurry, aux) -> dict:
    """Tiny-model sizes that fit the data: prior heads from the token width, low-level head from the targets."""
    dim_head = 32 if token_dim % 32 == 0 else 16 if token_dim % 16 == 0 else 2
    fields = dict(prior_dim_head=dim_head, prior_heads=max(1, token_dim // dim_head))
    if blurry is None:
        fields["blurry_recon"] = False
    else:
        fields.update(blurry_out_channels=int(blurry.shape[1]))
        if aux is not None:
            fields["blurry_aux_dim"] = int(aux.shape[-1])
    return fields
