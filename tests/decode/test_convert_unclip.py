"""The generative-models unCLIP converter, on tiny checkpoints in the original layout.

Tiny sgm-layout state dicts are made from a tiny diffusers model with random weights through the inverse tables;
the forward conversion must then rebuild a model whose outputs match the original exactly, agree with diffusers' own
single-file converter, and map the real SDXL-unCLIP key names known from the sgm layout.
"""

from __future__ import annotations

import pytest
import torch

from rt_mindeye.convert import unclip as conv
from rt_mindeye.decode.unclip import (UNCLIP_UNET_CONFIG, build_unet, build_vae, tiny_unet_config, tiny_vae_config,
                                      vector_condition)
from rt_mindeye.errors import CheckpointError, CheckpointKeyError


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero random values everywhere, so a swapped or dropped key changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


@pytest.fixture(scope="module")
def unet_pair():
    config = tiny_unet_config(sample_size=8, block_out_channels=(16, 32, 32),
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                              transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
                              layers_per_block=2)
    unet = _randomize(build_unet(config), seed=3)
    return config, unet


@pytest.fixture(scope="module")
def vae_pair():
    config = tiny_vae_config(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2)
    vae = _randomize(build_vae(config), seed=4)
    return config, vae


def _ldm_checkpoint(unet_config, unet, vae_config, vae) -> dict[str, torch.Tensor]:
    checkpoint = {conv.LDM_UNET_PREFIX + k: v.clone() for k, v in conv.unet_to_ldm(unet.state_dict(),
                                                                                     unet_config).items()}
    checkpoint.update({conv.LDM_VAE_PREFIX + k: v.clone()
                       for k, v in conv.vae_to_ldm(vae.state_dict(), vae_config).items()})
    # Parts a real checkpoint carries and the converter must drop on purpose.
    checkpoint["conditioner.embedders.0.model.visual.proj"] = torch.zeros(3, 3)
    checkpoint["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    return checkpoint


def _unet_output(unet, config):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    tokens = torch.randn(2, 5, config["cross_attention_dim"], generator=generator)
    added = vector_condition(config, 2, 768, (0, 0))
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 10]), encoder_hidden_states=tokens, added_cond_kwargs=added).sample


def test_sgm_layout_keys_are_what_the_original_model_names(unet_pair):
    config, unet = unet_pair
    ldm = conv.unet_to_ldm(unet.state_dict(), config)
    # Hand-written names from sgm openaimodel.UNetModel for 3 levels x 2 res blocks, attention on levels 1 and 2.
    for key in ["time_embed.0.weight", "time_embed.2.bias", "label_emb.0.0.weight", "label_emb.0.2.bias",
                "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.4.1.proj_in.weight", "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.6.0.op.bias", "input_blocks.8.1.transformer_blocks.1.ff.net.0.proj.weight",
                "middle_block.0.out_layers.3.weight", "middle_block.1.transformer_blocks.1.norm3.weight",
                "middle_block.2.in_layers.2.bias", "output_blocks.0.0.skip_connection.weight",
                "output_blocks.2.1.proj_out.weight", "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.bias",
                "output_blocks.8.0.out_layers.3.weight", "out.0.weight", "out.2.bias"]:
        assert key in ldm, key
    assert not any(k.startswith("output_blocks.8.1") for k in ldm)  # top level: no attention, no upsampler
    assert not any(k.startswith("input_blocks.9") for k in ldm)


def test_infer_config_recovers_the_structure(unet_pair, vae_pair):
    config, unet = unet_pair
    inferred = conv.infer_unet_config(conv.unet_to_ldm(unet.state_dict(), config), sample_size=8, num_head_channels=8,
                                      addition_time_embed_dim=8, norm_num_groups=8)
    for key in ["block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "transformer_layers_per_block", "cross_attention_dim", "use_linear_projection",
                "projection_class_embeddings_input_dim", "addition_embed_type", "in_channels", "out_channels"]:
        assert tuple(inferred[key]) == tuple(config[key]) if isinstance(config[key], tuple) else \
            inferred[key] == config[key], key
    vae_config, vae = vae_pair
    inferred_vae = conv.infer_vae_config(conv.vae_to_ldm(vae.state_dict(), vae_config), norm_num_groups=4)
    for key in ["block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"]:
        assert inferred_vae[key] == vae_config[key], key


def test_converted_checkpoint_reproduces_the_diffusers_forward_pass(unet_pair, vae_pair):
    unet_config, unet = unet_pair
    vae_config, vae = vae_pair
    checkpoint = _ldm_checkpoint(unet_config, unet, vae_config, vae)
    unet_sd, vae_sd, dropped = conv.split_checkpoint(checkpoint)
    assert sorted(dropped) == ["conditioner.embedders.0.model.visual.proj", "denoiser.sigmas"]

    rebuilt_unet = build_unet(unet_config)
    conv.load_strict(rebuilt_unet, conv.convert_unet(unet_sd, unet_config), None)
    assert torch.equal(_unet_output(rebuilt_unet, unet_config), _unet_output(unet, unet_config))

    rebuilt_vae = build_vae(vae_config)
    conv.load_strict(rebuilt_vae, conv.convert_vae(vae_sd, vae_config), None)
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(rebuilt_vae.decode(latent).sample, vae.decode(latent).sample)
        image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
        assert torch.equal(rebuilt_vae.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)


def test_agrees_with_diffusers_single_file_converter(unet_pair, vae_pair):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config, unet = unet_pair
    vae_config, vae = vae_pair
    checkpoint = _ldm_checkpoint(unet_config, unet, vae_config, vae)
    unet_sd, vae_sd, _ = conv.split_checkpoint(checkpoint)
    ours = conv.convert_unet(unet_sd, unet_config)
    theirs = convert_ldm_unet_checkpoint(checkpoint, dict(unet_config, layers_per_block=2))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_vae = conv.convert_vae(vae_sd, vae_config)
    theirs_vae = convert_ldm_vae_checkpoint({conv.LDM_VAE_PREFIX + k: v for k, v in vae_sd.items()}, vae_config)
    assert set(ours_vae) == set(theirs_vae)
    assert all(torch.equal(ours_vae[k], theirs_vae[k].reshape(ours_vae[k].shape)) for k in ours_vae)


def test_real_size_tables_cover_the_real_model_and_known_sdxl_keys():
    with torch.device("meta"):
        unet = build_unet(UNCLIP_UNET_CONFIG)
    diffusers_keys = unet.state_dict()
    ldm = conv.unet_to_ldm(diffusers_keys, UNCLIP_UNET_CONFIG)
    assert len(ldm) == len(diffusers_keys)
    for key in ["label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "input_blocks.7.1.transformer_blocks.9.attn2.to_v.weight", "input_blocks.6.0.op.weight",
                "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight"]:
        assert key in ldm, key
    assert tuple(ldm["label_emb.0.0.weight"].shape) == (1280, 1024)
    assert tuple(ldm["input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (1280, 1664)
    inferred = conv.infer_unet_config(ldm)
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in inferred.items()} == \
           {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in UNCLIP_UNET_CONFIG.items()}


def test_checkpoint_file_loads_strictly(tmp_path, unet_pair, vae_pair):
    unet_config, unet = unet_pair
    vae_config, vae = vae_pair
    checkpoint = _ldm_checkpoint(unet_config, unet, vae_config, vae)
    path = tmp_path / "unclip_tiny.ckpt"
    torch.save({"state_dict": checkpoint, "epoch": 0, "global_step": 110000}, path)
    assert conv.is_unclip_checkpoint(conv.read_checkpoint(path))
    # The tiny model's head width, Fourier width and groups are not MindEye2's: passed as options.
    loaded_unet, loaded_vae, dropped = conv.load_unclip_components(
        path, sample_size=8, unet_options=dict(num_head_channels=8, addition_time_embed_dim=8, norm_num_groups=8),
        vae_options=dict(norm_num_groups=4, scaling_factor=0.13025))
    assert len(dropped) == 2
    assert torch.equal(_unet_output(loaded_unet, unet_config), _unet_output(unet, unet_config))
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded_vae.decode(latent).sample, vae.decode(latent).sample)
    with pytest.raises(CheckpointError):
        conv.load_unclip_components(tmp_path / "absent.ckpt")


def test_unknown_missing_and_misshaped_keys_are_errors(unet_pair, vae_pair):
    unet_config, unet = unet_pair
    vae_config, vae = vae_pair
    checkpoint = _ldm_checkpoint(unet_config, unet, vae_config, vae)

    with pytest.raises(CheckpointKeyError) as info:
        conv.split_checkpoint({**checkpoint, "cond_stage_model.transformer.x": torch.zeros(1)})
    assert info.value.unexpected == ["cond_stage_model.transformer.x"]

    unet_sd, _, _ = conv.split_checkpoint(checkpoint)
    with pytest.raises(CheckpointKeyError) as info:
        conv.convert_unet({**unet_sd, "input_blocks.1.0.extra.weight": torch.zeros(1)}, unet_config)
    assert info.value.unexpected == ["unet:input_blocks.1.0.extra.weight"]

    converted = conv.convert_unet(unet_sd, unet_config)
    del converted["up_blocks.1.attentions.0.proj_out.weight"]
    converted["conv_in.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as info:
        conv.load_strict(build_unet(unet_config), converted, "x.ckpt")
    assert info.value.missing == ["up_blocks.1.attentions.0.proj_out.weight"]
    assert info.value.mismatched[0][0] == "conv_in.weight"

    probe = conv.UNCLIP_PROBE_KEYS[1]
    with pytest.raises(CheckpointError, match="probe"):
        conv.load_unclip_components({k: v for k, v in checkpoint.items() if k != probe})
    with pytest.raises(CheckpointError, match="no state dict"):
        conv.unwrap_state_dict({"epoch": 3, "optimizer": {"lr": 1}})


def test_diffusers_layout_blurry_vae_loads_strictly(tmp_path, vae_pair):
    vae_config, vae = vae_pair
    path = tmp_path / "sd_image_var_autoenc.pth"
    torch.save(vae.state_dict(), path)
    loaded = conv.load_diffusers_vae(path, vae_config)
    latent = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(loaded.decode(latent).sample, vae.decode(latent).sample)
    partial = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.conv_out")}
    torch.save(partial, path)
    with pytest.raises(CheckpointKeyError) as info:
        conv.load_diffusers_vae(path, vae_config)
    assert info.value.missing == ["decoder.conv_out.bias", "decoder.conv_out.weight"]
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        conv.read_checkpoint(tmp_path / "garbage.ckpt")
