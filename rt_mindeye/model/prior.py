"""The diffusion prior: from the backbone's tokens to image tokens (MindEye2's ``BrainDiffusionPrior``).

A DALL-E 2 style prior that predicts the clean image tokens (x_start) from noisy ones, conditioned on the brain
tokens, trained with MSE at a random timestep of a 100-step cosine schedule, and sampled with 20 DDIM steps.

Layout (key names of MindEyeV2 ``PriorNetwork`` inside dalle2-pytorch's ``DiffusionPrior``, so published weights load):

- ``noise_scheduler.*``: 13 schedule buffers of length ``timesteps`` (saved in the state dict).
- ``net.learned_query`` [seq, dim]: added to the noisy image tokens as positional embeddings ("pos_emb" mode).
- ``net.null_brain_embeds`` / ``net.null_image_embed`` [seq, dim]: stand-ins for a dropped condition
  (classifier-free guidance; each condition is dropped with probability 0.2 in training).
- ``net.to_time_embeds.0.1.net.*``: sinusoidal time features -> MLP (dim -> 2 dim -> 2 dim -> dim), one token.
- ``net.causal_transformer``: T5 relative position bias shared by all layers, then ``depth`` pre-norm layers of
  multi-query attention (``to_q`` per head, one shared ``to_kv`` head, a learned null key/value, cosine-similarity
  logits scaled by 16, rotary embedding on the first min(32, dim_head) channels) and a SwiGLU feed-forward; a final
  "stable" LayerNorm and ``project_out``. LayerNorms have only a gain ``g`` and the Linears have no bias. Despite the
  name, attention is not causal in MindEye2 (``causal=False``).
- The rotary frequencies are one tensor shared by every layer, so the state dict repeats it per layer.

The input sequence is [brain tokens (seq), time token (1), noisy image tokens + learned_query (seq)] and the prediction
is the last ``seq`` outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rt_mindeye.model.config import MindEyeConfig

# Names and order of the schedule buffers, as saved by dalle2-pytorch's NoiseScheduler.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "p2_loss_weight",
)
COSINE_SCHEDULE_OFFSET = 0.008  # "s" of Nichol & Dhariwal's cosine schedule
ATTENTION_LOGIT_SCALE = 16.0  # cosine-similarity attention: logits = 16 * cos(q, k)
REL_POS_BUCKETS = 32
REL_POS_MAX_DISTANCE = 128
ROTARY_MAX_DIM = 32


def cosine_schedule_tensors(timesteps: int) -> dict[str, torch.Tensor]:
    """The 13 buffers of a cosine schedule (computed in float64, stored as float32, as dalle2-pytorch does)."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / timesteps) + COSINE_SCHEDULE_OFFSET) / (1 + COSINE_SCHEDULE_OFFSET) * math.pi * 0.5) ** 2
    f = f / f[0]
    betas = torch.clip(1 - (f[1:] / f[:-1]), 0, 0.999)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        "p2_loss_weight": torch.ones_like(betas),  # p2 reweighting off (gamma 0): (k + snr) ** -0 == 1
    }
    return {name: values[name].to(torch.float32) for name in SCHEDULE_BUFFERS}


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over ``like`` (batch first)."""
    return values.gather(-1, t).to(like.dtype).reshape(t.shape[0], *((1,) * (like.ndim - 1)))


class NoiseSchedule(nn.Module):
    """Cosine noise schedule; its tensors are persistent buffers so they travel with the state dict."""

    def __init__(self, timesteps: int):
        super().__init__()
        self.num_timesteps = int(timesteps)
        for name, value in cosine_schedule_tensors(self.num_timesteps).items():
            self.register_buffer(name, value)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _gather(self.sqrt_alphas_cumprod, t, x_start) * x_start + \
            _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t)


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain only (``g``), as in dalle2-pytorch; ``stable`` divides by the row max first."""

    def __init__(self, dim: int, stable: bool = False):
        super().__init__()
        self.stable = stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3  # a larger eps keeps fp16 finite
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=-1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class SinusoidalTimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -scale)
        angles = t[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimeMLP(nn.Module):
    """dim -> 2 dim -> 2 dim -> dim with SiLU (keys ``net.0.0``, ``net.1.0``, ``net.2``)."""

    def __init__(self, dim_in: int, dim_out: int, expansion: int = 2):
        super().__init__()
        hidden = expansion * dim_out
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU(), nn.Identity()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Identity()),
            nn.Linear(hidden, dim_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sinusoid comes in float32 (dalle2 computes it so: ``self.net(x.float())``); the layers run in their own
        # precision, float16 on a GPU decoder (as MindEye2's inference under fp16 autocast).
        return self.net(x.float().to(self.net[2].weight.dtype))


class AsOneToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias, one value per head (key ``relative_attention_bias.weight``)."""

    def __init__(self, heads: int):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(REL_POS_BUCKETS, heads)

    @staticmethod
    def bucket(relative_position: torch.Tensor) -> torch.Tensor:
        n = torch.clamp(-relative_position, min=0)
        max_exact = REL_POS_BUCKETS // 2
        is_small = n < max_exact
        large = max_exact + (torch.log(n.float() / max_exact) / math.log(REL_POS_MAX_DISTANCE / max_exact)
                             * (REL_POS_BUCKETS - max_exact)).long()
        large = torch.clamp(large, max=REL_POS_BUCKETS - 1)
        return torch.where(is_small, n, large)

    def forward(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        q = torch.arange(n_queries, dtype=torch.long, device=device)
        k = torch.arange(n_keys, dtype=torch.long, device=device)
        values = self.relative_attention_bias(self.bucket(k[None, :] - q[:, None]))  # (i, j, heads)
        return values.permute(2, 0, 1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on interleaved channel pairs; ``freqs`` is a frozen parameter (as published)."""

    def __init__(self, dim: int):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate the first 2*len(freqs) channels of t (..., seq, d) by position along the seq axis."""
        seq = t.shape[-2]
        positions = torch.arange(seq, device=t.device, dtype=self.freqs.dtype)
        angles = positions[:, None] * self.freqs[None, :]
        angles = angles.repeat_interleave(2, dim=-1).to(torch.float32)  # (seq, rot_dim), pairs interleaved
        rot_dim = angles.shape[-1]
        head, tail = t[..., :rot_dim], t[..., rot_dim:]
        pairs = head.float().unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        head = head.float() * angles.cos() + rotated_half * angles.sin()
        return torch.cat((head.to(t.dtype), tail), dim=-1)


class PriorAttention(nn.Module):
    """Multi-query attention with a null key/value, cosine-similarity logits and rotary positions."""

    def __init__(self, dim: int, dim_head: int, heads: int, rotary: RotaryEmbedding):
        super().__init__()
        self.heads = heads
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.norm = GainLayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.rotary_emb = rotary  # the same module object in every layer (tied, as published)
        self.to_out = nn.Sequential(nn.Linear(dim_head * heads, dim, bias=False), GainLayerNorm(dim))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (b, h, n, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (b, n, d): one key/value head shared by all query heads
        q = self.rotary_emb.rotate(q)
        k = self.rotary_emb.rotate(k)
        null_k, null_v = (t.expand(b, 1, -1) for t in self.null_kv.unsqueeze(1).unbind(0))
        k = torch.cat((null_k.to(k.dtype), k), dim=1)
        v = torch.cat((null_v.to(v.dtype), v), dim=1)
        # Cosine similarity scaled by 16: normalise, then sqrt(16) on each side.
        root_scale = math.sqrt(ATTENTION_LOGIT_SCALE)
        q = F.normalize(q, dim=-1) * root_scale
        k = F.normalize(k, dim=-1) * root_scale
        sim = torch.einsum("bhid,bjd->bhij", q, k) + attn_bias
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype)
        out = torch.einsum("bhij,bjd->bhid", attn, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Keys .0.g, .1.weight, .5.weight: slots 3 (post-activation norm, off) and 4 (dropout 0) hold no weights.
    inner = mult * dim
    return nn.Sequential(GainLayerNorm(dim), nn.Linear(dim, inner * 2, bias=False), SwiGLU(), nn.Identity(),
                         nn.Dropout(0.0), nn.Linear(inner, dim, bias=False))


class PriorTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.rel_pos_bias = RelativePositionBias(heads)
        rotary = RotaryEmbedding(min(ROTARY_MAX_DIM, dim_head))
        self.layers = nn.ModuleList([
            nn.ModuleList([PriorAttention(dim, dim_head, heads, rotary), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        ])
        self.norm = GainLayerNorm(dim, stable=True)
        self.project_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        attn_bias = self.rel_pos_bias(n, n + 1, device=x.device).to(x.dtype)  # +1 key: the null key
        for attn, ff in self.layers:
            x = attn(x, attn_bias) + x
            x = ff(x) + x
        return self.project_out(self.norm(x))


class PriorNetwork(nn.Module):
    """The denoiser: (noisy image tokens, timestep, brain tokens) -> predicted clean image tokens."""

    def __init__(self, dim: int, num_tokens: int, depth: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.dim = dim
        self.num_tokens = num_tokens
        self.to_time_embeds = nn.Sequential(nn.Sequential(SinusoidalTimeEmbedding(dim), TimeMLP(dim, dim)),
                                            AsOneToken())
        self.learned_query = nn.Parameter(torch.randn(num_tokens, dim) * dim ** -0.5)
        self.causal_transformer = PriorTransformer(dim, depth, dim_head, heads, ff_mult)
        self.null_brain_embeds = nn.Parameter(torch.randn(num_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.randn(num_tokens, dim))

    def forward(self, image_embed: torch.Tensor, timesteps: torch.Tensor, brain_embed: torch.Tensor,
                brain_cond_drop_prob: float = 0.0, image_cond_drop_prob: float = 0.0) -> torch.Tensor:
        batch = image_embed.shape[0]
        brain_keep = _keep_mask(batch, brain_cond_drop_prob, image_embed.device)
        image_keep = _keep_mask(batch, image_cond_drop_prob, image_embed.device)
        brain_embed = torch.where(brain_keep, brain_embed, self.null_brain_embeds.to(brain_embed.dtype)[None])
        image_embed = torch.where(image_keep, image_embed, self.null_image_embed.to(image_embed.dtype)[None])
        # Timesteps stay float32 for the sinusoid whatever the weights' precision: in float16, t * freq near t = 99
        # would be off by up to 0.06 rad.
        time_embed = self.to_time_embeds(timesteps.to(torch.float32)).to(image_embed.dtype)
        image_embed = image_embed + self.learned_query.to(image_embed.dtype)[None]
        tokens = torch.cat((brain_embed, time_embed, image_embed), dim=1)
        return self.causal_transformer(tokens)[:, -self.num_tokens:, :]

    def forward_with_cond_scale(self, image_embed, timesteps, brain_embed, cond_scale: float = 1.0) -> torch.Tensor:
        out = self.forward(image_embed, timesteps, brain_embed)
        if cond_scale == 1.0:
            return out
        null = self.forward(image_embed, timesteps, brain_embed, brain_cond_drop_prob=1.0, image_cond_drop_prob=1.0)
        return null + (out - null) * cond_scale


def _keep_mask(batch: int, drop_prob: float, device: torch.device) -> torch.Tensor:
    """(batch, 1, 1) True where a condition is kept; draws from the global RNG only when 0 < p < 1."""
    if drop_prob <= 0.0:
        keep = torch.ones(batch, dtype=torch.bool, device=device)
    elif drop_prob >= 1.0:
        keep = torch.zeros(batch, dtype=torch.bool, device=device)
    else:
        keep = torch.rand(batch, device=device) < 1 - drop_prob
    return keep[:, None, None]


class DiffusionPrior(nn.Module):
    """Training loss (:meth:`forward`) and DDIM sampling (:meth:`sample`) around :class:`PriorNetwork`."""

    def __init__(self, config: MindEyeConfig):
        super().__init__()
        self.config = config
        self.noise_scheduler = NoiseSchedule(config.prior_timesteps)
        self.net = PriorNetwork(dim=config.token_dim, num_tokens=config.token_seq, depth=config.prior_depth,
                                dim_head=config.prior_dim_head, heads=config.prior_heads,
                                ff_mult=config.prior_ff_mult)
        self.cond_drop_prob = config.prior_cond_drop_prob

    def forward(self, brain_embed: torch.Tensor, image_embed: torch.Tensor, noise: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, cond_drop_prob: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE of the predicted clean tokens at a timestep (random unless given), returns (loss, prediction).

        ``noise``, ``timesteps`` and ``cond_drop_prob`` (default: the config's 0.2) fix what training draws."""
        batch = image_embed.shape[0]
        t = timesteps if timesteps is not None else torch.randint(0, self.noise_scheduler.num_timesteps, (batch,),
                                                                  device=image_embed.device)
        t = t.to(image_embed.device)
        if noise is None:
            noise = torch.randn_like(image_embed)
        drop = self.cond_drop_prob if cond_drop_prob is None else float(cond_drop_prob)
        noisy = self.noise_scheduler.q_sample(image_embed, t, noise)
        pred = self.net(noisy, t, brain_embed, brain_cond_drop_prob=drop, image_cond_drop_prob=drop)
        return F.mse_loss(pred, image_embed), pred

    @torch.no_grad()
    def sample(self, brain_embed: torch.Tensor, steps: int | None = None, cond_scale: float = 1.0,
               generator: torch.Generator | None = None, eta: float = 1.0) -> torch.Tensor:
        """DDIM sampling of image tokens for ``brain_embed`` (batch, seq, dim).

        Follows dalle2-pytorch's ``p_sample_loop_ddim`` as MindEye2 runs it (20 steps, eta 1), including its use of
        ``alphas_cumprod_prev`` as the alpha table, so that published weights see the schedule they were used with.
        Every random draw comes from ``generator`` (on its own device, then moved), so a CPU generator seeded per
        trial gives the same noise on every device and never touches the global random state.
        """
        steps = int(steps or self.config.prior_sample_steps)
        total = self.noise_scheduler.num_timesteps
        if not 1 <= steps <= total:
            raise ValueError(f"steps must be in 1..{total}, got {steps}")
        alphas = self.noise_scheduler.alphas_cumprod_prev
        times = torch.linspace(-1.0, total, steps + 1)[:-1].int().tolist()[::-1]
        shape, device = brain_embed.shape, brain_embed.device
        noise_device = generator.device if generator is not None else device

        # The sample stays float32 (dalle2 draws ``torch.randn(shape)``), whatever the brain tokens' precision: with
        # float16 weights the network runs under autocast, as MindEye2's inference does.
        def draw() -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32).to(device)

        x = draw()
        x_start = x
        for time, time_next in zip(times[:-1], times[1:]):
            t = torch.full((shape[0],), time, device=device, dtype=torch.long)
            x_start = self.net.forward_with_cond_scale(x, t, brain_embed, cond_scale=cond_scale)
            if time_next < 0:
                x = x_start
                break
            pred_noise = self.noise_scheduler.predict_noise_from_start(x, t, x_start)
            alpha, alpha_next = alphas[time], alphas[time_next]
            c1 = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            c2 = ((1 - alpha_next) - c1 ** 2).sqrt()
            if time_next > 0:
                noise = draw()
            else:
                noise = torch.zeros_like(x)
            x = x_start * alpha_next.sqrt() + c1 * noise + c2 * pred_noise
        else:
            # steps == 1 leaves no pair: one denoising pass from pure noise at the last time.
            if len(times) == 1:
                t = torch.full((shape[0],), total - 1, device=device, dtype=torch.long)
                x = self.net.forward_with_cond_scale(x, t, brain_embed, cond_scale=cond_scale)
        return x
