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
