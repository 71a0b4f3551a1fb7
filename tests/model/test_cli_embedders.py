"""`rt-mindeye model check` exit codes and messages; the OpenCLIP and phantom image embedders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.cli import main
from rt_mindeye.convert.mindeye2 import save_container
from rt_mindeye.errors import CheckpointKeyError
from rt_mindeye.model.embedders import OpenCLIPEmbedder, PhantomEmbedder, images_to_tensor
from rt_mindeye.model.mindeye import MindEyeModule


@pytest.fixture
def tiny_checkpoint(micro, tmp_path):
    torch.manual_seed(0)
    model = MindEyeModule(micro((20, 24)))
    return save_container(tmp_path / "last.pth", model), model


def test_model_check_passes_on_a_fitting_checkpoint(tiny_checkpoint, capsys):
    path, model = tiny_checkpoint
    assert main(["model", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "every key and shape fits" in out
    assert f"{model.parameter_counts()['total']:,}" in out
    assert main(["model", "check", str(path), "--new-subject-voxels", "31"]) == 0


def test_model_check_fails_naming_the_keys(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    payload = torch.load(path, weights_only=True)
    state = payload["model_state_dict"]
    del state["backbone.clip_proj.8.weight"]
    state["backbone.clip_proj.2.weight"] = torch.zeros(16, 15)
    state["ridge.stray"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(payload, bad)
    assert main(["model", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    for key in ("backbone.clip_proj.8.weight", "backbone.clip_proj.2.weight", "ridge.stray"):
        assert key in err
    assert main(["model", "check", str(tmp_path / "missing.pth")]) == 2


TINY_VIT = dict(image_size=28, patch_size=7, width=32, layers=2, head_width=16, mlp_ratio=2.0)


def test_openclip_embedder_returns_ln_post_patch_tokens(tmp_path):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(0)
    tower = _build_vision_tower(16, CLIPVisionCfg(**TINY_VIT)).eval()
    full = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    full["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3)  # a text-tower key: ignored
    path = tmp_path / "open_clip_model.pt"
    torch.save(full, path)
    embedder = OpenCLIPEmbedder(path, model_name=None, vision_cfg=TINY_VIT, embed_dim=16)
    assert embedder.tokens_shape == (16, 32)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    tokens = embedder.embed(images)
    assert tokens.shape == (3, 16, 32) and tokens.dtype == torch.float32
    # Independent computation: MindEye2's (x + 1) / 2 input mapping, CLIP normalisation, then ln_post, no CLS.
    x = (images_to_tensor(images) + 1) / 2
    x = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = tower.ln_post(tower.transformer(tower._embeds(x)))[:, 1:]
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)
    # A file for another architecture is refused with the offending keys named.
    with pytest.raises(CheckpointKeyError):
        OpenCLIPEmbedder(path, model_name=None, vision_cfg={**TINY_VIT, "width": 48}, embed_dim=16)


def test_phantom_embedder_tokens():
    embedder = PhantomEmbedder(layer="stage7", grid=2)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    tokens = embedder.embed(images)
    assert tokens.shape == (2, 4, 320) == (2, *embedder.tokens_shape)
    assert torch.isfinite(tokens).all() and not torch.equal(tokens[0], tokens[1])
    with pytest.raises(ValueError):
        PhantomEmbedder(layer="stage9")
    # Training targets: the same tokens from one network pass, the image at 28 px, stage-5 maps as 49 aux tokens.
    from rt_mindeye.model.data import image_targets

    targets = image_targets(images, embedder, blurry_size=28)
    torch.testing.assert_close(targets.tokens, tokens)
    assert targets.blurry.shape == (2, 3, 28, 28) and targets.blurry.min() >= -1 and targets.blurry.max() <= 1
    assert targets.aux.shape == (2, 49, 112)


def test_pretrain_and_finetune_commands_on_npz_data(micro, subject_data, tmp_path):
    import json

    from rt_mindeye.model.data import load_npz, save_npz

    config = micro((20, 24))
    files = [save_npz(tmp_path / f"s{i}.npz", subject_data(16, v, i, config, f"s{i}"))
             for i, v in ((1, 20), (2, 24))]
    new = save_npz(tmp_path / "new.npz", subject_data(16, 18, 5, config, "new"))
    assert load_npz(new).voxels.shape == (16, 18)
    common = ["--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main(["pretrain", "--out", str(tmp_path / "pre"), "--data", *map(str, files), *common]) == 0
    log = json.loads((tmp_path / "pre" / "train_log.json").read_text())
    assert log["model"]["subject_names"] == ["s1", "s2"] and log["epochs"] == 1
    assert main(["finetune", str(tmp_path / "pre" / "last.pth"), "--out", str(tmp_path / "fine"), "--data",
                 str(new), *common]) == 0
    assert main(["model", "check", str(tmp_path / "fine" / "last.pth")]) == 0
    # Resuming a finished run trains nothing more and still succeeds.
    assert main(["finetune", str(tmp_path / "pre" / "last.pth"), "--out", str(tmp_path / "fine"), "--data",
                 str(new), "--resume", *common]) == 0
