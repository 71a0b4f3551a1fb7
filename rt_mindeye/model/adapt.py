"""Parameter-efficient adaptation of the shared model to a new subject (low-rank adapters, in the spirit of
MindTuner and Duala: the shared backbone and prior stay frozen, the new subject gets its own input head and a few
low-rank corrections to the shared layers).

With one hour of data (MindEye2: 750 trials; a CPU calibration here: 100-300), fine-tuning every shared parameter
lets the new subject's noise overwrite what pretraining learned. Here the pretrained weights never change:

* the new subject's ridge head trains in full (it is new, and it is the subject-specific part MindEye2 also trains);
* every ``nn.Linear`` of the backbone's residual blocks, its token map (``backbone_linear``) and the retrieval
  projector (``clip_proj``) gets a low-rank adapter ``W x + (alpha / r) B A x`` with ``A`` (r x in) random and
  ``B`` (out x r) zero, so training starts exactly at the pretrained function (Hu et al. 2021, LoRA);
* the diffusion prior, the low-level head and all LayerNorms stay frozen.

The adapters live in ``model.adapters`` and act through forward hooks, so the wrapped layers keep their names and
:func:`merge_adapters` folds them into the weights afterwards: the fine-tuned checkpoint has exactly the published
MindEye2 layout (the decoder needs nothing new).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rt_mindeye.model.mindeye import MindEyeModule

#: Where adapters go (module-name prefixes inside the model): the shared backbone's linear layers.
ADAPTED_PREFIXES = ("backbone.mixer_blocks1.", "backbone.backbone_linear", "backbone.clip_proj.")
ADAPTER_MODULE = "adapters"


class LowRankAdapter(nn.Module):
    """``(alpha / rank) * B A x`` for one ``nn.Linear`` (A: rank x in, B: out x rank, B starts at zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank, self.scale = int(rank), float(alpha) / float(rank)
        self.A = nn.Parameter(torch.empty(self.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, self.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


@dataclass
class AdapterHandle:
    """What :func:`add_adapters` attached, so :func:`merge_adapters` can fold and detach it."""

    names: list[str]
    hooks: list
    frozen: list[str]


def _key(name: str) -> str:
    return name.replace(".", "__")


def adaptable_layers(model: MindEyeModule) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(ADAPTED_PREFIXES)]


def add_adapters(model: MindEyeModule, rank: int, alpha: float | None = None,
                 train_subjects: tuple[int, ...] | None = None) -> AdapterHandle:
    """Freeze the shared model, attach a rank-``rank`` adapter to every adaptable linear layer and leave the ridge
    heads of ``train_subjects`` (default: all) trainable. Returns the handle for :func:`merge_adapters`."""
    if rank < 1:
        raise ValueError(f"adapter rank must be >= 1, got {rank}")
    if hasattr(model, ADAPTER_MODULE):
        raise RuntimeError("the model already carries adapters; merge them first")
    alpha = float(2 * rank if alpha is None else alpha)
    heads = set(range(len(model.ridge.linears)) if train_subjects is None else train_subjects)
    frozen = []
    for name, param in model.named_parameters():
        head = name.startswith("ridge.linears.") and int(name.split(".")[2]) in heads
        if param.requires_grad and not head:
            param.requires_grad_(False)
            frozen.append(name)
    adapters = nn.ModuleDict()
    hooks, names = [], []
    for name, layer in adaptable_layers(model):
        adapter = LowRankAdapter(layer.in_features, layer.out_features, rank, alpha).to(
            device=layer.weight.device, dtype=layer.weight.dtype)
        adapters[_key(name)] = adapter
        hooks.append(layer.register_forward_hook(lambda _m, args, out, a=adapter: out + a(args[0])))
        names.append(name)
    model.add_module(ADAPTER_MODULE, adapters)
    return AdapterHandle(names=names, hooks=hooks, frozen=frozen)


@torch.no_grad()
def merge_adapters(model: MindEyeModule, handle: AdapterHandle) -> MindEyeModule:
    """Fold every adapter into its layer's weight, remove hooks and adapters, and unfreeze what
    :func:`add_adapters` froze. The model computes the same function and has the published state-dict layout."""
    adapters = getattr(model, ADAPTER_MODULE)
    layers = dict(model.named_modules())
    for name, hook in zip(handle.names, handle.hooks):
        hook.remove()
        layer = layers[name]
        layer.weight += adapters[_key(name)].delta_weight().to(layer.weight.dtype)
    delattr(model, ADAPTER_MODULE)
    params = dict(model.named_parameters())
    for name in handle.frozen:
        params[name].requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- a closed-form start for the new subject's head ------------------------------------------------------------------


def invert_backbone(model: MindEyeModule, image_tokens: torch.Tensor, steps: int = 200, lr: float = 0.05,
                    temperature: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Hidden vectors (n, hidden) that the frozen pretrained backbone maps onto the given images' tokens: the
    retrieval embedding of ``backbone(h_i)`` is made closest to image i's tokens and far from the other images'
    (InfoNCE over the images, plus a cosine pull). Only ``h`` is optimised; the model is left as it was."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    targets = F.normalize(image_tokens.float().flatten(1), dim=1)
    generator = torch.Generator().manual_seed(seed)
    hidden = (0.01 * torch.randn(len(targets), 1, model.config.hidden_dim, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([hidden], lr=lr)
    labels = torch.arange(len(targets))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                pred = F.normalize(retrieval_path(model.backbone, hidden).flatten(1), dim=1)
                sims = pred @ targets.T
                loss = F.cross_entropy(sims / temperature, labels) + (1.0 - sims.diagonal()).mean()
                loss.backward()
                optimizer.step()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return hidden.detach()[:, 0]


def retrieval_path(backbone, hidden: torch.Tensor) -> torch.Tensor:
    """``backbone(hidden).clip_voxels`` without the low-level head (which the inversion does not need and which
    costs most of a tiny backbone's forward): the same residual blocks, token map and projector, in the same order."""
    _, tokens = backbone.mix(hidden)
    return backbone.clip_proj(tokens)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0)
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge regression y ~ x W + b with the penalty chosen by generalised cross-validation (one SVD for all
    penalties, scaled to the data: alpha x mean squared singular value). Returns (W (in, out), b (out,), alpha)."""
    x = x.double()
    y = y.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    u, s, vt = torch.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc
    scale = float((s ** 2).mean())
    best = None
    n = x.shape[0]
    for alpha in alphas:
        lam = alpha * scale
        shrink = s ** 2 / (s ** 2 + lam)
        fitted = u @ (shrink[:, None] * uty)
        gcv = float(((yc - fitted) ** 2).sum() / (1.0 - shrink.sum() / n) ** 2)
        if best is None or gcv < best[0]:
            best = (gcv, alpha, lam)
    _, alpha, lam = best
    weights = vt.T @ ((s / (s ** 2 + lam))[:, None] * uty)
    bias = y_mean - x_mean @ weights
    return weights.float(), bias.float(), float(alpha)


@torch.no_grad()
def init_head_closed_form(model: MindEyeModule, voxels: torch.Tensor, image_tokens: torch.Tensor,
                          subject: int = 0, image_keys: torch.Tensor | None = None, seed: int = 0) -> float:
    """Start the new subject's ridge head at the best linear map into the pretrained model's input space: invert the
    frozen backbone for each training image (:func:`invert_backbone`), then regress those hidden vectors on the
    voxels in closed form (:func:`ridge_fit`). ``image_keys`` (n,) groups trials of the same image (default: equal
    token maps). Returns the chosen ridge penalty."""
    if image_keys is None:
        _, image_keys = torch.unique(image_tokens.flatten(1), dim=0, return_inverse=True)
    unique_keys, first = np.unique(image_keys.numpy(), return_index=True)
    hidden = invert_backbone(model, image_tokens[torch.from_numpy(first)], seed=seed)
    position = {int(k): i for i, k in enumerate(unique_keys)}
    targets = hidden[torch.tensor([position[int(k)] for k in image_keys])]
    weights, bias, alpha = ridge_fit(voxels.float(), targets)
    head = model.ridge.linears[subject]
    head.weight.copy_(weights.T.to(head.weight.dtype))
    head.bias.copy_(bias.to(head.bias.dtype))
    return alpha
