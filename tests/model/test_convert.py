"""Reading and loading checkpoint files: containers, prefixes, dtypes, drop list, and the errors for bad keys."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch
from safetensors.torch import save_file

from rt_mindeye.convert.mindeye2 import (check_checkpoint, convert, infer_config, load_mindeye2, read_checkpoint,
                                         save_container)
from rt_mindeye.errors import CheckpointError, CheckpointKeyError
from rt_mindeye.model.mindeye import MindEyeModule


class OptimiserScaler:
    """Stands for an object DeepSpeed pickles into optimizer_state_dict (not importable by the loader's allow-list)."""

    def __init__(self):
        self.scale = 65536.0


@pytest.fixture
def tiny_model(micro):
    torch.manual_seed(0)
    return MindEyeModule(micro((20, 24), blurry=True))


def published_container(model: MindEyeModule) -> dict:
    """The layout MindEyeV2's save_ckpt writes: no rt-mindeye config, only the seven published entries."""
    return {"epoch": 149, "model_state_dict": model.state_dict(), "optimizer_state_dict": {"state": {}},
            "lr_scheduler": {"last_epoch": 10}, "train_losses": [1.0], "test_losses": [2.0], "lrs": [3e-4]}


def assert_same_weights(a: MindEyeModule, b: MindEyeModule, skip_prefix: str | None = None):
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if skip_prefix and key.startswith(skip_prefix):
            continue
        torch.testing.assert_close(sb[key].float(), sa[key].float(), msg=key)


def test_published_container_loads_strictly_with_inferred_config(tiny_model, tmp_path):
    path = tmp_path / "last.pth"
    torch.save(published_container(tiny_model), path)
    loaded = load_mindeye2(path)
    assert loaded.config == tiny_model.config
    assert loaded.dropped == [] and loaded.initialised == []
    assert_same_weights(tiny_model, loaded.model)


def test_new_subject_drops_every_old_ridge_head_and_initialises_a_fresh_one(tiny_model, tmp_path):
    path = tmp_path / "last.pth"
    torch.save(published_container(tiny_model), path)
    loaded = load_mindeye2(path, new_subject_voxels=33, new_subject_name="sub-new", seed=3)
    assert loaded.config.subject_voxels == (33,)
    assert loaded.config.subject_names == ("sub-new",)
    assert sorted(loaded.dropped) == sorted(f"ridge.linears.{i}.{p}" for i in (0, 1) for p in ("weight", "bias"))
    assert loaded.initialised == ["ridge.linears.0.bias", "ridge.linears.0.weight"]
    assert_same_weights(tiny_model, loaded.model, skip_prefix="ridge.")
    # The new head's bias is fresh, not inherited from the first old subject (unlike MindEyeV2's notebook).
    assert not torch.equal(loaded.model.ridge.linears[0].bias, tiny_model.ridge.linears[0].bias)
    again = load_mindeye2(path, new_subject_voxels=33, seed=3)
    assert torch.equal(again.model.ridge.linears[0].weight, loaded.model.ridge.linears[0].weight)
    out = loaded.model(torch.randn(2, 33), "sub-new")
    assert out.tokens.shape == (2, 4, 16)


def test_missing_unexpected_and_misshaped_keys_are_all_named(tiny_model, tmp_path):
    container = published_container(tiny_model)
    state = container["model_state_dict"]
    del state["backbone.clip_proj.8.bias"]
    state["backbone.extra.weight"] = torch.zeros(2)
    state["backbone.mixer_blocks1.0.1.3.weight"] = torch.zeros(5, 5)
    path = tmp_path / "bad.pth"
    torch.save(container, path)
    with pytest.raises(CheckpointKeyError) as info:
        load_mindeye2(path)
    err = info.value
    assert err.missing == ["backbone.clip_proj.8.bias"]
    assert err.unexpected == ["backbone.extra.weight"]
    assert err.mismatched == [("backbone.mixer_blocks1.0.1.3.weight", (32, 32), (5, 5))]
    assert err.path == path and "backbone.clip_proj.8.bias" in str(err)


def test_unexpected_keys_are_errors_even_for_a_new_subject(tiny_model, tmp_path):
    container = published_container(tiny_model)
    container["model_state_dict"]["diffusion_prior.stray"] = torch.zeros(1)
    path = tmp_path / "stray.pth"
    torch.save(container, path)
    with pytest.raises(CheckpointKeyError) as info:
        load_mindeye2(path, new_subject_voxels=10)
    assert info.value.unexpected == ["diffusion_prior.stray"]


def test_fp16_bare_state_dict_with_wrapper_prefixes(tiny_model, tmp_path):
    state = {f"module._orig_mod.{k}": v.half() for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    loaded = load_mindeye2(path)
    assert loaded.dtypes == {"float16": len(state)}
    assert loaded.model.backbone.backbone_linear.weight.dtype == torch.float16
    # The schedule is recomputed exactly in float32 whatever the file's precision.
    assert loaded.model.diffusion_prior.noise_scheduler.betas.dtype == torch.float32
    as_fp32 = load_mindeye2(path, dtype=torch.float32)
    assert as_fp32.model.backbone.backbone_linear.weight.dtype == torch.float32
    assert convert({"module.a": 1}) == {"a": 1}


def test_safetensors_file(tiny_model, tmp_path):
    path = tmp_path / "model.safetensors"
    state = {k: v.clone().contiguous() for k, v in tiny_model.state_dict().items()}
    # safetensors refuses shared tensors: the rotary frequencies are tied across layers in the module.
    save_file(state, str(path))
    loaded = load_mindeye2(path)
    assert_same_weights(tiny_model, loaded.model)


def test_unknown_pickled_objects_become_inert_placeholders(tiny_model, tmp_path):
    container = published_container(tiny_model)
    container["optimizer_state_dict"] = {"loss_scaler": OptimiserScaler(), "groups": collections.OrderedDict(a=1)}
    path = tmp_path / "deepspeed_like.pth"
    torch.save(container, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what a plain safe load does with such a file
    contents = read_checkpoint(path)
    assert len(contents.placeholders) == 1 and contents.placeholders[0].endswith(".OptimiserScaler")
    assert not isinstance(contents.container["optimizer_state_dict"]["loss_scaler"], OptimiserScaler)
    loaded = load_mindeye2(path)
    assert_same_weights(tiny_model, loaded.model)


def test_not_a_checkpoint_and_wrong_schedule(tmp_path, tiny_model):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(missing)
    other = tmp_path / "other.pth"
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="probe keys"):
        load_mindeye2(other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_checkpoint(garbage)
    for content in (b"truncated", None):  # a few bytes; a real checkpoint cut in half (a copy that stopped)
        cut = tmp_path / "cut.pth"
        if content is None:
            torch.save(published_container(tiny_model), cut)
            content = cut.read_bytes()[: cut.stat().st_size // 2]
        cut.write_bytes(content)
        with pytest.raises(CheckpointError, match="cut.pth"):
            read_checkpoint(cut)
    container = published_container(tiny_model)
    container["model_state_dict"]["diffusion_prior.noise_scheduler.betas"] = torch.full((100,), 0.02)
    bad = tmp_path / "schedule.pth"
    torch.save(container, bad)
    with pytest.raises(CheckpointError, match="cosine schedule"):
        load_mindeye2(bad)


def test_container_round_trip_keeps_the_config_and_check_report(tiny_model, tmp_path):
    path = save_container(tmp_path / "rt.pth", tiny_model, epoch=7, train_losses=[1.5])
    assert torch.load(path, weights_only=True)["epoch"] == 7  # plain data only
    report = check_checkpoint(path)
    assert report.config == tiny_model.config
    assert report.parameters == tiny_model.parameter_counts()
    assert report.stored["ridge"] == tiny_model.parameter_counts()["ridge"]
    assert infer_config(convert(read_checkpoint(path).state_dict)).hidden_dim == 32
