"""The MindEye2 shared-subject model: ridge heads, residual MLP backbone, diffusion prior, training, embedders.

Public API::

    from rt_mindeye.model import MindEyeConfig, MindEyeModule, build_model
    config = MindEyeConfig.preset("light", subject_voxels=[14278, 15226])
    model = MindEyeModule(config)
    out = model(voxels, subject=0)          # tokens, clip_voxels, blurry_latent, blurry_aux

Loading published checkpoints lives in :mod:`rt_mindeye.convert.mindeye2`; training in :mod:`rt_mindeye.model.train`;
image embedders in :mod:`rt_mindeye.model.embedders`. See docs/model.md.
"""

from rt_mindeye.model.config import PRESETS, MindEyeConfig
from rt_mindeye.model.mindeye import MindEyeModule, MindEyeOutput, build_model

__all__ = ["PRESETS", "MindEyeConfig", "MindEyeModule", "MindEyeOutput", "build_model"]
