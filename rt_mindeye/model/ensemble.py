"""Ensembles of fine-tuned models: several fine-tunes of the same subject (other seeds) decoded together.

With a few hundred calibration trials, the fine-tune's own seed (the new head's initialisation and the batch order)
moves retrieval as much as any setting does; the mean of several short fine-tunes is steadier, and on the phantom's
sessions better, than one long one (docs/model.md, "ensemble of fine-tunes").
"""

from __future__ import annotations

from typing import Sequence

import torch


def average_normalised(outputs: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """The members' outputs (each (B, ...)), every row flattened and scaled to unit L2 norm, averaged, in the
    members' shape. Retrieval scores cosines, so each member votes with its direction, not its norm. One member is
    returned unchanged."""
    if not outputs:
        raise ValueError("average_normalised needs at least one member's output")
    if len(outputs) == 1:
        return outputs[0]
    shape = outputs[0].shape
    total = torch.zeros((shape[0], outputs[0][0].numel()), dtype=torch.float32, device=outputs[0].device)
    for out in outputs:
        if out.shape != shape:
            raise ValueError(f"ensemble members disagree on the output shape: {tuple(out.shape)} vs {tuple(shape)}")
        flat = out.reshape(shape[0], -1).float()
        total += flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)
    return (total / len(outputs)).reshape(shape)
