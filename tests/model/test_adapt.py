"""Low-rank adapters for a new subject: only the new head and the adapters train, the merged model computes the same
function in the published layout, and an adapter fine-tune runs through ``finetune`` into a loadable checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rt_mindeye.convert.mindeye2 import load_mindeye2, save_container
from rt_mindeye.errors import ConfigError
from rt_mindeye.model.adapt import add_adapters, adaptable_layers, merge_adapters, trainable_parameters
from rt_mindeye.model.mindeye import MindEyeModule
from rt_mindeye.model.train import TrainConfig, finetune

FAST = TrainConfig(epochs=4, batch_size=16, max_lr=3e-3, seed=7, warmup_epochs=1.0)


def test_adapters_freeze_the_shared_model_start_at_its_function_and_merge_exactly(micro):
    torch.manual_seed(0)
    model = MindEyeModule(micro((20, 24))).eval()
    keys = list(model.state_dict())
    voxels = torch.randn(5, 24)
    before = model(voxels, 1).clip_voxels
    handle = add_adapters(model, rank=2, train_subjects=(1,))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ridge.linears.1.weight", "ridge.linears.1.bias"} | {
        n for n in trainable if n.startswith("adapters.")}
    assert len([n for n in trainable if n.startswith("adapters.")]) == 2 * len(adaptable_layers(model))
    assert trainable_parameters(model) < sum(p.numel() for p in model.parameters()) / 2
    torch.testing.assert_close(model(voxels, 1).clip_voxels, before)  # B starts at zero
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.B.normal_()
    adapted = model(voxels, 1).clip_voxels
    assert not torch.allclose(adapted, before)
    merge_adapters(model, handle)
    assert list(model.state_dict()) == keys  # published layout, no adapter keys left
    torch.testing.assert_close(model(voxels, 1).clip_voxels, adapted, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


def test_adapter_finetune_trains_head_and_adapters_only_and_saves_a_loadable_checkpoint(micro, subject_data, tmp_path):
    config = micro((20, 24))
    torch.manual_seed(0)
    pretrained = MindEyeModule(config)
    path = save_container(tmp_path / "pre.pth", pretrained)
    new = subject_data(32, 30, 9, config, "new")
    prior = {k: v for k, v in pretrained.state_dict().items() if k.startswith("diffusion_prior.")}
    out = tmp_path / "tuned.pth"
    tuned, result = finetune(path, new, dataclasses.replace(FAST, adapter_rank=2), checkpoint_path=out,
                             progress=False)
    after = tuned.state_dict()
    assert all(torch.equal(prior[k], after[k]) for k in prior)  # the prior is never touched
    assert not torch.equal(pretrained.state_dict()["backbone.backbone_linear.weight"],
                           after["backbone.backbone_linear.weight"])  # the merged adapter changed it
    assert result.history[-1].loss < result.history[0].loss
    reloaded = load_mindeye2(out).model.eval()
    tuned.eval()
    torch.testing.assert_close(reloaded(new.voxels[:4]).clip_voxels, tuned(new.voxels[:4]).clip_voxels)
    with pytest.raises(ConfigError, match="adapter_rank"):
        finetune(path, new, dataclasses.replace(FAST, adapter_rank=2), resume_from=out, progress=False)


def test_closed_form_head_starts_decoding_before_any_training(micro, subject_data, tmp_path):
    from rt_mindeye.model.adapt import init_head_closed_form, ridge_fit

    # ridge_fit recovers a linear map
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    fitted, bias, _ = ridge_fit(x, x @ w + 2.0, alphas=(1e-6,))
    torch.testing.assert_close(fitted, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(bias, torch.full((3,), 2.0), atol=1e-3, rtol=1e-3)

    config = micro((20, 24))
    torch.manual_seed(0)
    pretrained = MindEyeModule(config)
    pretrain_data = [subject_data(64, 20, 1, config, "a"), subject_data(64, 24, 2, config, "b")]
    from rt_mindeye.model.train import pretrain
    pretrain(pretrained, pretrain_data, dataclasses.replace(FAST, epochs=15), progress=False)
    path = save_container(tmp_path / "pre.pth", pretrained)
    new = subject_data(48, 30, 9, config, "new")
    random_start = load_mindeye2(path, new_subject_voxels=30, seed=1).model.eval()
    closed = load_mindeye2(path, new_subject_voxels=30, seed=1).model.eval()
    init_head_closed_form(closed, new.voxels, new.image_tokens)

    def top1(model):
        from rt_mindeye.eval.decoding import paired_directions
        with torch.no_grad():
            return paired_directions(model(new.voxels).clip_voxels, new.image_tokens).brain_to_image

    assert top1(closed) > top1(random_start) + 0.2
    shared = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("ridge.")}
    assert all(torch.equal(v, closed.state_dict()[k]) for k, v in shared.items())  # only the head was set
    tuned, _ = finetune(path, new, dataclasses.replace(FAST, epochs=1, head_init="closed_form"), progress=False)
    assert not torch.equal(tuned.state_dict()["ridge.linears.0.weight"],
                           random_start.state_dict()["ridge.linears.0.weight"])


def test_retrieval_path_equals_the_backbones_retrieval_output(micro):
    from rt_mindeye.model.adapt import retrieval_path

    torch.manual_seed(0)
    model = MindEyeModule(micro((20,), blurry=True)).eval()
    hidden = torch.randn(3, 1, model.config.hidden_dim)
    torch.testing.assert_close(retrieval_path(model.backbone, hidden), model.backbone(hidden).clip_voxels)
