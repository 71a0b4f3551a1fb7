"""GPU paths: float16 unCLIP, torch.compile, TensorRT where installed, float16 retrieval, the float16 model under
autocast, and a training step on CUDA. Run on a GPU host with ``RT_MINDEYE_GPU_TESTS=1 python -m pytest -m gpu``
(the suite hides GPUs otherwise; see tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.decode import accel
from rt_mindeye.decode.config import ReconstructConfig
from rt_mindeye.decode.reconstruct import UnclipReconstructor
from rt_mindeye.decode.retrieval import Retriever

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible (set RT_MINDEYE_GPU_TESTS=1 on a GPU host)")]

IMAGE = 16


def _tokens(seed: int) -> torch.Tensor:
    return torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(seed))


def _config(**changes) -> ReconstructConfig:
    return ReconstructConfig(**{"image_size": IMAGE, "steps": 4, "scheduler": "euler", "guidance": 5.0,
                                "unconditional": "noise", **changes})


def test_float16_unclip_on_the_gpu_is_reproducible_and_close_to_float32_on_the_cpu(tiny_unet, tiny_vae):
    gpu = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(device="cuda"))
    assert gpu.unet_dtype == torch.float16 and gpu.vae_dtype == torch.bfloat16
    first = gpu.reconstruct(_tokens(0), seed=3)
    again = gpu.reconstruct(_tokens(0), seed=3)
    assert torch.equal(first.images, again.images)  # a replay on the same device is bit for bit
    cpu = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(device="cpu")).reconstruct(_tokens(0), seed=3)
    assert (first.latents - cpu.latents).norm() / cpu.latents.norm() < 2e-2


def test_torch_compile_matches_eager_on_the_gpu(tiny_unet, tiny_vae):
    eager = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(device="cuda")).reconstruct(_tokens(1), seed=2)
    compiled = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(device="cuda", compile="torch"))
    out = compiled.reconstruct(_tokens(1), seed=2)
    assert (out.latents - eager.latents).norm() / eager.latents.norm() < 1e-2


@pytest.mark.skipif(not accel.available(), reason="torch-tensorrt is not installed")
def test_tensorrt_matches_eager(tiny_unet, tiny_vae):
    eager = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(device="cuda")).reconstruct(_tokens(1), seed=2)
    trt = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(device="cuda", compile="tensorrt"))
    out = trt.reconstruct(_tokens(1), seed=2)
    assert (out.latents - eager.latents).norm() / eager.latents.norm() < 2e-2


def test_float16_retrieval_on_the_gpu_ranks_like_float32_on_the_cpu():
    candidates = torch.randn(300, 16, 64, generator=torch.Generator().manual_seed(0))
    queries = candidates[:20] + 0.8 * torch.randn(20, 16, 64, generator=torch.Generator().manual_seed(1))
    cpu, _ = Retriever(candidates).topk(queries, k=1)
    gpu, _ = Retriever(candidates, device="cuda", dtype=torch.float16).topk(queries, k=1)
    assert np.array_equal(cpu, gpu)


def test_float16_model_under_autocast_and_a_training_step_on_the_gpu(tmp_path):
    from rt_mindeye.convert.mindeye2 import load_for_inference, save_container
    from rt_mindeye.model.config import MindEyeConfig
    from rt_mindeye.model.mindeye import MindEyeModule
    from rt_mindeye.model.train import SubjectData, Trainer, TrainConfig

    torch.manual_seed(0)
    config = MindEyeConfig.preset("tiny", [30])
    model = MindEyeModule(config).eval()
    path = save_container(tmp_path / "last.pth", model)
    gpu = load_for_inference(path, device="cuda").model
    assert gpu.backbone.backbone_linear.weight.dtype == torch.float16
    voxels = torch.randn(2, 30)
    with torch.no_grad(), gpu.autocast():
        out = gpu(voxels.cuda(), 0)
        sample = gpu.diffusion_prior.sample(out.tokens, steps=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(voxels, 0)
    assert (out.tokens.float().cpu() - reference.tokens).norm() / reference.tokens.norm() < 1e-2
    assert bool(torch.isfinite(sample).all())

    data = SubjectData(torch.randn(24, 30), torch.randn(24, config.token_seq, config.token_dim))
    result = Trainer(MindEyeModule(config.replace(blurry_recon=False)),
                     TrainConfig(epochs=1, batch_size=12, device="cuda"), progress=False).fit([data])
    assert np.isfinite(result.history[-1].loss)
