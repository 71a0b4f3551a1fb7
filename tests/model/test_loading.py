"""Loading as the decoder does: meta-device build, tensors converted one by one, ``model check --load``."""

from __future__ import annotations

import json

import torch

from rt_mindeye.cli import main
from rt_mindeye.convert.loading import materialize, release_file_pages
from rt_mindeye.convert.mindeye2 import load_mindeye2, save_container
from rt_mindeye.decode.unclip import write_tiny_unclip_checkpoint
from rt_mindeye.model.mindeye import MindEyeModule


def test_float32_file_loads_as_float16_exactly_with_source_pages_released(micro, tmp_path):
    torch.manual_seed(0)
    model = MindEyeModule(micro((20, 24), blurry=True))
    path = save_container(tmp_path / "last.pth", model)  # float32, with the prior's tied rotary tensors
    loaded = load_mindeye2(path, dtype=torch.float16).model
    expected = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for key, value in loaded.state_dict().items():
        if ".noise_scheduler." in key:
            assert value.dtype == torch.float32  # recomputed exactly, never rounded to fp16
            continue
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert not any(t.is_meta for t in loaded.parameters())


def test_released_pages_of_a_memory_mapped_file_are_read_again(tmp_path):
    """MADV_DONTNEED on a private file mapping drops pages; reading the tensor again brings the file's values back."""
    original = torch.arange(300_000, dtype=torch.float32)
    torch.save({"t": original, "u": original[10:]}, tmp_path / "t.pt")
    mapped = torch.load(tmp_path / "t.pt", mmap=True, weights_only=True)
    half = materialize(mapped, dtype=torch.float16, file_backed=True)
    release_file_pages(mapped["t"])
    assert torch.equal(mapped["t"], original) and torch.equal(half["u"], original[10:].half())


def test_model_check_load_reports_memory_for_mindeye2_and_unclip(micro, tmp_path, capsys):
    torch.manual_seed(0)
    model = MindEyeModule(micro((20, 24)))
    path = save_container(tmp_path / "last.pth", model.half())
    assert main(["model", "check", str(path), "--load", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    load = report["load"]
    assert load["kind"] == "mindeye2" and load["dtypes"] == {"model": "float32"}  # the decoder's choice on a CPU
    assert load["parameters"] == model.parameter_counts()["total"]
    assert load["peak_rss_bytes"] >= load["baseline_rss_bytes"] > 0 and load["fp16_bytes"] > 0

    unclip = write_tiny_unclip_checkpoint(tmp_path / "unclip.ckpt", cross_attention_dim=16)
    assert main(["model", "check", str(unclip), "--load", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "loaded unclip" in out and "unet float16, vae float16" in out and "ratio" in out


def test_float16_weights_run_under_autocast_with_float32_inputs(micro, tmp_path):
    """The decoder's GPU precision, checked on the CPU: float16 weights, float32 inputs, autocast (as MindEye2's
    inference); the backbone matches float32 closely and the prior's sample stays finite."""
    from rt_mindeye.convert.mindeye2 import load_for_inference

    torch.manual_seed(0)
    model = MindEyeModule(micro((20,), blurry=True)).eval()
    path = save_container(tmp_path / "last.pth", model)
    half = load_for_inference(path, dtype=torch.float16).model
    voxels = torch.randn(3, 20)
    with torch.no_grad(), half.autocast():
        out = half(voxels, 0)
        sample = half.diffusion_prior.sample(out.tokens, steps=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(voxels, 0)
    assert float((out.tokens.float() - reference.tokens).norm() / reference.tokens.norm()) < 1e-2
    assert bool(torch.isfinite(sample).all()) and sample.shape == reference.tokens.shape
