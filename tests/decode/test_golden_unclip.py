"""One guided unCLIP step against generative-models' own sampler (tensors made with the official code; see
tests/data/mindeye2_golden/README.md): a tiny sgm UNetModel converted by rt-mindeye's converter, the vector condition,
classifier-free guidance at 5 and one Euler step of MindEye2's EulerEDMSampler."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rt_mindeye.convert.unclip import LDM_UNET_PREFIX, convert_unet, infer_unet_config
from rt_mindeye.decode.config import ReconstructConfig
from rt_mindeye.decode.reconstruct import UnclipReconstructor
from rt_mindeye.decode.schedulers import make_scheduler
from rt_mindeye.decode.unclip import build_unet, vector_condition

PREFIX = "unclip.state_dict."


@pytest.fixture(scope="module")
def golden(data_dir):
    return load_file(str(data_dir / "mindeye2_golden" / "mindeye2_golden.safetensors"))


@pytest.fixture(scope="module")
def converted_unet(golden):
    sgm = {k[len(PREFIX):]: v.float() for k, v in golden.items() if k.startswith(PREFIX)}
    config = infer_unet_config(sgm, sample_size=8, num_head_channels=32)
    unet = build_unet(config)
    unet.load_state_dict(convert_unet(sgm, config), strict=True)
    return unet.eval()


def test_converted_unet_and_vector_condition_match_the_official_unet(golden, converted_unet):
    x, tokens = golden["unclip.x"], golden["unclip.tokens"]
    added = vector_condition(converted_unet.config, 2, 768, (0, 0))
    with torch.no_grad():
        eps = converted_unet(x, torch.full((2,), 999), encoder_hidden_states=tokens, added_cond_kwargs=added).sample
    torch.testing.assert_close(eps, golden["unclip.eps_t999"], atol=1e-5, rtol=1e-4)


def test_one_guided_euler_step_matches_the_official_sampler(golden, converted_unet, tiny_vae):
    recon = UnclipReconstructor(converted_unet, tiny_vae, config=ReconstructConfig(
        image_size=16, device="cpu", scheduler="euler", steps=38, guidance=5.0, unconditional="noise"))
    sched = make_scheduler("euler")
    sched.set_timesteps(38)
    t = int(golden["unclip.timestep"])
    index = int((sched.timesteps == t).nonzero()[0, 0])
    assert int(sched.timesteps[index + 1]) == int(golden["unclip.timestep_next"])
    torch.testing.assert_close(sched.sigmas[index:index + 2].float(),
                               torch.cat([golden["unclip.sigma"], golden["unclip.sigma_next"]]), rtol=1e-5, atol=0)
    cond = torch.cat([golden["unclip.uncond_tokens"], golden["unclip.tokens"]])
    added = vector_condition(converted_unet.config, 4, 768, (0, 0))
    with torch.no_grad():
        out = recon.denoise_step(sched, golden["unclip.x"], sched.timesteps[index], cond, added, 5.0)
    torch.testing.assert_close(out, golden["unclip.step_out"], atol=1e-4, rtol=1e-4)
