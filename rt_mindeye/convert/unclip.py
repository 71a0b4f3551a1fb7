"""Conversion of MindEye2's SDXL-unCLIP checkpoint (Stability generative-models layout) to diffusers components.

The published ``unclip6_epoch0_step110000.ckpt`` is a Lightning checkpoint of an ``sgm`` ``DiffusionEngine``
(config ``src/generative_models/configs/unclip6.yaml`` in MedARC-AI/MindEyeV2): ``state_dict`` holds

* ``model.diffusion_model.*``: the ``openaimodel.UNetModel`` (SDXL layout: model_channels 320, channel_mult 1/2/4,
  2 res blocks, attention at the two deepest levels with transformer depths 2 and 10, 64-channel heads, linear
  projections) with ``context_dim`` 1664 (the ViT-bigG tokens) and ``adm_in_channels`` 1024 (Fourier features of
  original size and crop coordinates, 4 x 256);
* ``first_stage_model.*``: the SDXL VAE (ldm ``Encoder``/``Decoder``, ch 128, ch_mult 1/2/4/4, scale 0.13025);
* ``conditioner.*``: the trainable OpenCLIP ViT-bigG image embedder used in training. At inference the diffusion
  prior provides the tokens, so these keys are dropped on purpose, as is the denoiser's sigma table.

Everything here is data: probe keys identify the layout, prefix constants split the components, and rename tables
map module paths. The module tables are generated from the block structure read off the weights
(:func:`infer_unet_config`), so a tiny checkpoint in the same layout converts through the same code. The
converters are pure ``dict -> dict`` functions; unknown keys raise :class:`CheckpointKeyError`, and
:func:`load_unclip_components` checks the result against the diffusers model strictly (missing, unexpected and
mis-shaped keys are all errors).
"""

from __future__ import annotations

import pickle  # only for its exception type: nothing here unpickles beyond torch's weights_only loader
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from rt_mindeye.errors import CheckpointError, CheckpointKeyError

# --- probe keys and prefixes ---------------------------------------------------------------------------------------

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
# Keys whose presence identifies a generative-models (sgm/ldm) unCLIP checkpoint with a vector condition.
UNCLIP_PROBE_KEYS = (
    LDM_UNET_PREFIX + "input_blocks.0.0.weight",
    LDM_UNET_PREFIX + "label_emb.0.0.weight",
    LDM_VAE_PREFIX + "decoder.conv_in.weight",
)
# Lightning and plain-torch containers seen around state dicts, unwrapped by name.
CONTAINER_KEYS = ("state_dict", "model_state_dict")
# Parts of the checkpoint not needed at inference, dropped on purpose (every other unknown prefix is an error).
DROPPED_PREFIXES = {
    "conditioner.": "training-time OpenCLIP ViT-bigG image embedder; the diffusion prior supplies the tokens",
    "denoiser.": "discrete sigma table of the sgm denoiser; the diffusers scheduler recomputes it",
    "model_ema.": "EMA copy of the UNet (the published checkpoint was trained without EMA)",
    "loss_fn.": "training loss buffers",
}

# Hyper-parameters the weights do not determine, with MindEye2's values.
NUM_HEAD_CHANNELS = 64  # unclip6.yaml num_head_channels
ADDITION_TIME_EMBED_DIM = 256  # ConcatTimestepEmbedderND outdim: Fourier features per scalar condition
SDXL_VAE_SCALING_FACTOR = 0.13025  # unclip6.yaml scale_factor
NORM_NUM_GROUPS = 32

# --- rename tables ---------------------------------------------------------------------------------------------------

# Top-level UNet modules: sgm name -> diffusers name.
UNET_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Inside a UNet ResBlock: sgm name -> diffusers ResnetBlock2D name.
UNET_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# SpatialTransformer and BasicTransformerBlock parameters have the same names in both layouts (norm, proj_in,
# transformer_blocks.N.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}, proj_out): mapped as whole subtrees.
UNET_DOWNSAMPLE_RENAMES = {"op": "conv"}
UNET_UPSAMPLE_RENAMES = {"conv": "conv"}

# VAE (ldm Encoder/Decoder -> diffusers AutoencoderKL).
VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
VAE_RESNET_RENAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
VAE_ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# ldm VAE attention projections are 1x1 convolutions, diffusers ones linear layers: weights differ by two unit dims.
VAE_CONV_TO_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")

_INT = re.compile(r"^\d+$")


# --- checkpoint container ---------------------------------------------------------------------------------------------


def unwrap_state_dict(checkpoint: Mapping[str, Any], path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Return the tensor dict inside a Lightning/torch container (``state_dict`` / ``model_state_dict``)."""
    for key in CONTAINER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(path, f"no state dict found (looked for the container keys {list(CONTAINER_KEYS)} and "
                                "for a plain dict of tensors)")


def is_unclip_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    """True when every probe key of the generative-models unCLIP layout is present."""
    return all(key in state_dict for key in UNCLIP_PROBE_KEYS)


def split_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split a full unCLIP state dict into (UNet keys, VAE keys, dropped keys), prefixes removed.

    Keys under :data:`DROPPED_PREFIXES` are returned in the third list; any other key outside the UNet and VAE
    prefixes raises :class:`CheckpointKeyError`.
    """
    missing = [key for key in UNCLIP_PROBE_KEYS if key not in state_dict]
    if missing:
        raise CheckpointKeyError(path, missing=missing)
    unet, vae, dropped, unexpected = {}, {}, [], []
    for key, value in state_dict.items():
        if key.startswith(LDM_UNET_PREFIX):
            unet[key[len(LDM_UNET_PREFIX):]] = value
        elif key.startswith(LDM_VAE_PREFIX):
            vae[key[len(LDM_VAE_PREFIX):]] = value
        elif any(key.startswith(prefix) for prefix in DROPPED_PREFIXES):
            dropped.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointKeyError(path, unexpected=unexpected)
    return unet, vae, dropped


# --- UNet -------------------------------------------------------------------------------------------------------------


def _indices(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``prefix.N.*``."""
    found = set()
    for key in state_dict:
        if key.startswith(prefix + "."):
            head = key[len(prefix) + 1:].split(".", 1)[0]
            if _INT.match(head):
                found.add(int(head))
    return sorted(found)


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):] if key.startswith(prefix) else key: v for key, v in state_dict.items()}
    return dict(state_dict)


def _need(state_dict: Mapping[str, torch.Tensor], key: str, component: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointKeyError(None, missing=[f"{component}:{key}"])
    return state_dict[key]


def _transformer_depth(state_dict: Mapping[str, torch.Tensor], module: str) -> int:
    return len(_indices(state_dict, f"{module}.transformer_blocks"))


def infer_unet_config(state_dict: Mapping[str, torch.Tensor], *, sample_size: int = 96,
                      num_head_channels: int = NUM_HEAD_CHANNELS,
                      addition_time_embed_dim: int = ADDITION_TIME_EMBED_DIM,
                      norm_num_groups: int = NORM_NUM_GROUPS) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of an sgm UNet state dict (``model.diffusion_model.`` optional).

    Channels, levels, res blocks per level, where attention is, transformer depths, ``context_dim``, the vector
    condition width and linear vs convolutional projections are read off the weights; the head width, Fourier
    width, group count and sample size are not stored in weights and come from the arguments (MindEye2's values).
    """
    sd = _strip_prefix(state_dict, LDM_UNET_PREFIX)
    conv_in = _need(sd, "input_blocks.0.0.weight", "unet")
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(_need(sd, "out.2.weight", "unet").shape[0])
    time_embed_dim = int(_need(sd, "time_embed.0.weight", "unet").shape[0])

    # Walk the input blocks: a block with ``0.op`` is a downsampler and closes a level.
    levels: list[dict[str, Any]] = [{"channels": None, "resnets": 0, "depths": []}]
    for index in _indices(sd, "input_blocks"):
        if index == 0:
            continue
        block = f"input_blocks.{index}"
        if f"{block}.0.op.weight" in sd:
            levels.append({"channels": None, "resnets": 0, "depths": []})
            continue
        level = levels[-1]
        level["channels"] = int(_need(sd, f"{block}.0.out_layers.3.weight", "unet").shape[0])
        level["resnets"] += 1
        level["depths"].append(_transformer_depth(sd, f"{block}.1") if f"{block}.1.proj_in.weight" in sd else 0)
    if any(level["resnets"] == 0 for level in levels):
        raise CheckpointError(None, "unet: a level of input_blocks has no res block (unrecognised layout)")
    layers = {level["resnets"] for level in levels}
    if len(layers) != 1:
        raise CheckpointError(None, f"unet: levels have different numbers of res blocks {sorted(layers)}")
    layers_per_block = layers.pop()
    block_out_channels = tuple(level["channels"] for level in levels)
    depths = []
    for number, level in enumerate(levels):
        if len(set(level["depths"])) != 1:
            raise CheckpointError(None, f"unet: level {number} mixes transformer depths {level['depths']}")
        depths.append(level["depths"][0])
    has_attention = [depth > 0 for depth in depths]

    # Up path: the same structure reversed, with one more res block per level; read its depths for checking.
    up_depths = []
    for up_level in range(len(levels)):
        first = up_level * (layers_per_block + 1)
        block = f"output_blocks.{first}"
        up_depths.append(_transformer_depth(sd, f"{block}.1") if f"{block}.1.proj_in.weight" in sd else 0)
    reverse_depths = list(reversed(depths))
    if up_depths != reverse_depths:
        raise CheckpointError(None, f"unet: up-path transformer depths {up_depths} do not mirror the down path "
                                    f"{reverse_depths}")
    mid_depth = _transformer_depth(sd, "middle_block.1")
    if mid_depth == 0:
        raise CheckpointError(None, "unet: middle_block has no transformer (unrecognised layout)")

    # diffusers gives the mid block the deepest level's transformer depth.
    config_depths = [max(depth, 1) for depth in depths]
    if not has_attention[-1]:
        config_depths[-1] = mid_depth
    elif depths[-1] != mid_depth:
        raise CheckpointError(None, f"unet: middle transformer depth {mid_depth} differs from the deepest level "
                                    f"{depths[-1]} (not supported)")
    proj_in = next(sd[k] for k in sd if k.endswith(".proj_in.weight"))
    to_k = next(sd[k] for k in sd if k.endswith(".attn2.to_k.weight"))
    config: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        # Levels without attention ignore their entry (1 keeps diffusers' validation happy).
        "transformer_layers_per_block": tuple(config_depths),
        "attention_head_dim": tuple(max(c // num_head_channels, 1) for c in block_out_channels),  # = heads
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": proj_in.ndim == 2,
        "norm_num_groups": norm_num_groups,
        "flip_sin_to_cos": True,  # sgm timestep_embedding puts cos first
        "freq_shift": 0,
    }
    if time_embed_dim != 4 * model_channels:
        config["time_embedding_dim"] = time_embed_dim
    if "label_emb.0.0.weight" in sd:
        adm_in_channels = int(sd["label_emb.0.0.weight"].shape[1])
        if adm_in_channels % addition_time_embed_dim:
            raise CheckpointError(None, f"unet: vector condition width {adm_in_channels} is not a multiple of "
                                        f"{addition_time_embed_dim} Fourier features")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                      projection_class_embeddings_input_dim=adm_in_channels)
    return config


def _config_structure(config: Mapping[str, Any]) -> tuple[int, int, list[bool]]:
    levels = len(config["block_out_channels"])
    attention = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    return levels, int(config["layers_per_block"]), attention


def unet_module_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Module-path rename table sgm -> diffusers for a UNet of this diffusers config.

    Entries are module prefixes: a key converts by replacing its longest matching prefix. Res blocks expand to
    their sub-layers (:data:`UNET_RESNET_RENAMES`), transformers map as whole subtrees.
    """
    levels, layers, attention = _config_structure(config)
    table = dict(UNET_TOP_LEVEL)
    if config.get("addition_embed_type") != "text_time":
        del table["label_emb.0.0"], table["label_emb.0.2"]

    def resnet(src: str, dst: str) -> None:
        for old, new in UNET_RESNET_RENAMES.items():
            table[f"{src}.{old}"] = f"{dst}.{new}"

    index = 0
    for level in range(levels):
        for layer in range(layers):
            index += 1
            resnet(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{layer}")
            if attention[level]:
                table[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{layer}"
        if level != levels - 1:
            index += 1
            for old, new in UNET_DOWNSAMPLE_RENAMES.items():
                table[f"input_blocks.{index}.0.{old}"] = f"down_blocks.{level}.downsamplers.0.{new}"
    resnet("middle_block.0", "mid_block.resnets.0")
    table["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    for up in range(levels):
        level = levels - 1 - up
        for layer in range(layers + 1):
            index = up * (layers + 1) + layer
            resnet(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{layer}")
            if attention[level]:
                table[f"output_blocks.{index}.1"] = f"up_blocks.{up}.attentions.{layer}"
            if layer == layers and up != levels - 1:
                slot = 2 if attention[level] else 1
                for old, new in UNET_UPSAMPLE_RENAMES.items():
                    table[f"output_blocks.{index}.{slot}.{old}"] = f"up_blocks.{up}.upsamplers.0.{new}"
    return table


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest module prefix of ``key`` found in ``table``; None when nothing matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return None


def _apply_table(state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str], component: str
                 ) -> dict[str, torch.Tensor]:
    converted, unexpected = {}, []
    for key, value in state_dict.items():
        new_key = _rename(key, table)
        if new_key is None:
            unexpected.append(f"{component}:{key}")
        else:
            converted[new_key] = value
    if unexpected:
        raise CheckpointKeyError(None, unexpected=unexpected)
    return converted


def convert_unet(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
                 ) -> dict[str, torch.Tensor]:
    """sgm UNet state dict (``model.diffusion_model.`` optional) -> diffusers ``UNet2DConditionModel`` keys.

    Pure: tensors are passed through (not copied). Keys no table entry covers raise :class:`CheckpointKeyError`.
    """
    sd = _strip_prefix(state_dict, LDM_UNET_PREFIX)
    config = config if config is not None else infer_unet_config(sd)
    return _apply_table(sd, unet_module_table(config), "unet")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_unet` (diffusers keys -> sgm keys without prefix); used to build test fixtures."""
    inverse = {new: old for old, new in unet_module_table(config).items()}
    return _apply_table(state_dict, inverse, "unet")


# --- VAE --------------------------------------------------------------------------------------------------------------


def infer_vae_config(state_dict: Mapping[str, torch.Tensor], *, scaling_factor: float = SDXL_VAE_SCALING_FACTOR,
                     norm_num_groups: int = NORM_NUM_GROUPS, sample_size: int = 1024) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of an ldm VAE state dict (``first_stage_model.`` optional)."""
    sd = _strip_prefix(state_dict, LDM_VAE_PREFIX)
    levels = _indices(sd, "encoder.down")
    if not levels:
        raise CheckpointKeyError(None, missing=["vae:encoder.down.0.block.0.conv1.weight"])
    channels = tuple(int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", "vae").shape[0]) for i in levels)
    layers = len(_indices(sd, "encoder.down.0.block"))
    return {
        "in_channels": int(_need(sd, "encoder.conv_in.weight", "vae").shape[1]),
        "out_channels": int(_need(sd, "decoder.conv_out.weight", "vae").shape[0]),
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": int(_need(sd, "post_quant_conv.weight", "vae").shape[0]),
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


def vae_module_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Module-path rename table ldm VAE -> diffusers ``AutoencoderKL`` for this config."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    table = dict(VAE_TOP_LEVEL)

    def resnet(src: str, dst: str) -> None:
        for old, new in VAE_RESNET_RENAMES.items():
            table[f"{src}.{old}"] = f"{dst}.{new}"

    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        for old, new in VAE_ATTENTION_RENAMES.items():
            table[f"{side}.mid.attn_1.{old}"] = f"{side}.mid_block.attentions.0.{new}"
    for level in range(levels):
        for layer in range(layers):
            resnet(f"encoder.down.{level}.block.{layer}", f"encoder.down_blocks.{level}.resnets.{layer}")
        if level != levels - 1:
            table[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        # The ldm decoder numbers its levels from the lowest resolution up; diffusers from the deepest down.
        up = levels - 1 - level
        for layer in range(layers + 1):
            resnet(f"decoder.up.{level}.block.{layer}", f"decoder.up_blocks.{up}.resnets.{layer}")
        if level != 0:
            table[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return table


def convert_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
                ) -> dict[str, torch.Tensor]:
    """ldm VAE state dict (``first_stage_model.`` optional) -> diffusers ``AutoencoderKL`` keys."""
    sd = _strip_prefix(state_dict, LDM_VAE_PREFIX)
    config = config if config is not None else infer_vae_config(sd)
    converted = _apply_table(sd, vae_module_table(config), "vae")
    for key, value in converted.items():
        if key.endswith(VAE_CONV_TO_LINEAR) and value.ndim == 4:
            converted[key] = value.reshape(value.shape[0], value.shape[1])
    return converted


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_vae` (diffusers keys -> ldm keys without prefix); used to build test fixtures."""
    restored = dict(state_dict)
    for key, value in restored.items():
        if key.endswith(VAE_CONV_TO_LINEAR) and value.ndim == 2:
            restored[key] = value.reshape(*value.shape, 1, 1)
    inverse = {new: old for old, new in vae_module_table(config).items()}
    return _apply_table(restored, inverse, "vae")


# --- loading ----------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch checkpoint with ``weights_only=True`` (memory-mapped)."""
    return read_checkpoint_mapped(path)[0]


def read_checkpoint_mapped(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """:func:`read_checkpoint` and whether its tensors live in a private file mapping (``mmap=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), False
    mapped = True
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
            mapped = False
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # weights_only refuses pickled training state (optimizer objects, OmegaConf hyper-parameters): never
        # unpickle arbitrary code here; re-save the tensors once, in a trusted environment.
        raise CheckpointError(path, f"cannot read with torch.load(weights_only=True) ({exc}); if the file holds "
                                    "pickled training state, extract its 'state_dict' once in a trusted environment "
                                    "and save it with safetensors.torch.save_file") from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(path, f"expected a dict, found {type(checkpoint).__name__}")
    return unwrap_state_dict(checkpoint, path), mapped


def check_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path | None) -> None:
    """Any missing, unexpected or mis-shaped key of ``state_dict`` for ``model`` raises CheckpointKeyError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [(k, tuple(own[k].shape), tuple(v.shape)) for k, v in state_dict.items()
                  if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(path, missing=missing, unexpected=unexpected, mismatched=mismatched)


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path | None) -> None:
    """Load ``state_dict`` into ``model`` (copying); any missing, unexpected or mis-shaped key raises
    CheckpointKeyError."""
    check_strict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True, assign=False)


def build_unet(config: Mapping[str, Any], device: str | torch.device | None = None):
    """A ``UNet2DConditionModel`` for ``config``; ``device="meta"`` allocates nothing (for assigning weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device or "cpu"):
        return UNet2DConditionModel(**dict(config))


def build_vae(config: Mapping[str, Any], device: str | torch.device | None = None):
    from diffusers import AutoencoderKL

    with torch.device(device or "cpu"):
        return AutoencoderKL(**dict(config))


def _assign(model: torch.nn.Module, weights: dict[str, torch.Tensor], path) -> torch.nn.Module:
    """Strictly assign ``weights`` into a meta-device ``model``; every tensor must end up real."""
    check_strict(model, weights, path)
    model.load_state_dict(weights, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointKeyError(path, missing=left)
    return model.eval().requires_grad_(False)


def load_unclip_components(path_or_state_dict, *, sample_size: int = 96, dtype: torch.dtype = torch.float32,
                           unet_options: Mapping[str, Any] | None = None,
                           vae_options: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                           vae_dtype: torch.dtype | None = None):
    """Convert an unCLIP checkpoint (path or state dict) into ``(unet, vae, dropped_keys)`` diffusers modules.

    Strict: a key the tables do not cover, or a diffusers parameter the checkpoint lacks, raises
    :class:`CheckpointKeyError` naming them. ``dropped_keys`` lists the checkpoint keys left out on purpose.
    ``unet_options`` / ``vae_options`` pass the settings weights do not determine to :func:`infer_unet_config` /
    :func:`infer_vae_config` (defaults: MindEye2's).

    The modules are built on the meta device and the converted tensors assigned into them, each placed on ``device``
    in ``dtype`` (the VAE in ``vae_dtype``, default ``dtype``) one at a time
    (:func:`~rt_mindeye.convert.loading.materialize`): the dropped OpenCLIP conditioner is never read, and a float16
    checkpoint memory-mapped from disk is assigned without a copy, so the peak memory stays near the UNet + VAE size in
    ``dtype`` rather than a float32 model built and then overwritten.
    """
    from rt_mindeye.convert.loading import materialize

    path = None
    mapped = False
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict)
        state_dict, mapped = read_checkpoint_mapped(path)
    else:
        state_dict = unwrap_state_dict(path_or_state_dict)
    if not is_unclip_checkpoint(state_dict):
        missing = [key for key in UNCLIP_PROBE_KEYS if key not in state_dict]
        raise CheckpointError(path, f"not a generative-models unCLIP checkpoint: probe keys {missing} are absent")
    unet_sd, vae_sd, dropped = split_checkpoint(state_dict, path)
    try:
        unet_config = infer_unet_config(unet_sd, **{"sample_size": sample_size, **dict(unet_options or {})})
        vae_config = infer_vae_config(vae_sd, **dict(vae_options or {}))
        unet_weights = convert_unet(unet_sd, unet_config)
        vae_weights = convert_vae(vae_sd, vae_config)
    except CheckpointKeyError as exc:
        raise CheckpointKeyError(path, exc.missing, exc.unexpected, exc.mismatched) from exc
    except CheckpointError as exc:
        raise CheckpointError(path, exc.problem) from exc
    unet = _assign(build_unet(unet_config, "meta"),
                   materialize(unet_weights, dtype=dtype, device=device, file_backed=mapped), path)
    vae = _assign(build_vae(vae_config, "meta"),
                  materialize(vae_weights, dtype=vae_dtype or dtype, device=device, file_backed=mapped), path)
    return unet, vae, dropped


SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     scaling_factor=0.18215)


def infer_diffusers_vae_config(state_dict: Mapping[str, torch.Tensor], path=None, *,
                               scaling_factor: float = 0.18215, norm_num_groups: int = NORM_NUM_GROUPS
                               ) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of a diffusers-layout VAE state dict (levels, widths, layers, latent channels
    from the shapes; group count and scale, which shapes do not hold, are SD's). :data:`SD_VAE_CONFIG` for
    MindEye2's SD 1.x VAE."""
    levels = _indices(state_dict, "encoder.down_blocks")
    if not levels:
        raise CheckpointKeyError(path, missing=["encoder.down_blocks.0.resnets.0.conv1.weight"])
    widths = tuple(int(_need(state_dict, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", "vae").shape[0])
                   for i in levels)
    return dict(SD_VAE_CONFIG, block_out_channels=widths,
                layers_per_block=len(_indices(state_dict, "encoder.down_blocks.0.resnets")),
                latent_channels=int(_need(state_dict, "post_quant_conv.weight", "vae").shape[0]),
                down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), norm_num_groups=norm_num_groups,
                scaling_factor=scaling_factor)


def load_diffusers_vae(path: str | Path, config: Mapping[str, Any] | None = None, *,
                       dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a diffusers-layout ``AutoencoderKL`` state dict (MindEye2's ``sd_image_var_autoenc.pth``), strictly.

    Without ``config`` the architecture is read from the shapes (:func:`infer_diffusers_vae_config`; MindEye2's
    SD 1.x VAE gives :data:`SD_VAE_CONFIG`: 128/256/512/512, 2 layers, scale 0.18215). Any ``.safetensors`` / torch file with a plain state dict (or one under
    ``state_dict``) works; built on the meta device and assigned, like :func:`load_unclip_components`.
    """
    from rt_mindeye.convert.loading import materialize

    state_dict, mapped = read_checkpoint_mapped(path)
    config = dict(config) if config is not None else infer_diffusers_vae_config(state_dict, path)
    weights = materialize(state_dict, dtype=dtype, device=device, file_backed=mapped)
    return _assign(build_vae(config, "meta"), weights, Path(path))
