"""Configuration of the calibration workflow (section ``calibration`` of the session YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rt_mindeye.config import setting
from rt_mindeye.glm.config import GLMConfig
from rt_mindeye.model.train import TrainConfig

#: The calibration's fine-tune: the pretrained shared parts stay frozen and the new subject's ridge head trains with
#: rank-8 low-rank adapters on the backbone (rt_mindeye.model.adapt), up to MindEye2's 150 epochs within the budget.
#: On the phantom's GLM betas (bench/model.py, 3 seeds, every method on the same CPU time) it beats training
#: everything with the head alone first (the previous default), MindEye2's recipe (everything from the start) and the
#: same model from scratch; docs/model.md has the table.
FINETUNE = dict(time_budget_min=2.0, epochs=150, batch_size=16, adapter_rank=8, max_lr=3e-3)


@dataclass(frozen=True)
class CalibrationConfig:
    subject: str = setting("sub-01", "subject label; live runs refuse a bundle made for another subject")
    calibration_runs: int = setting(2, "the session's first N runs (series) are calibration runs", min=1)
    events_dir: Path | None = setting(None, "folder of planned BIDS events files run-XX_events.tsv (default: "
                                            "SESSION/events, then SESSION/func)")
    condition_column: str = setting("trial_type", "events column that identifies repeats of the same image (BIDS "
                                                  "trial_type; stim_file when trial_type is generic)")
    stimuli_dir: Path | None = setting(None, "folder of the stimulus images; every image there is a retrieval "
                                             "candidate (default: SESSION/stimuli)")
    anatomical_mask: Path | None = setting(None, "NIfTI visual-cortex mask in session space (the decoder's voxels "
                                                 "are chosen inside it); default: the head mask of the reference")
    noise_pool_voxels: int = setting(3000, "brain voxels outside the anatomical mask added to the GLM so its noise "
                                           "pool can draw on them", min=0)
    reliability_threshold: float | None = setting(
        None, "keep voxels whose repeat reliability reaches this value (null: use reliability_top_fraction)",
        min=-1.0, max=1.0)
    reliability_top_fraction: float = setting(0.6, "keep this fraction of the anatomical voxels, most reliable "
                                                    "first (when no threshold is given)", min=0.01, max=1.0)
    pretrained: Path | None = setting(None, "shared MindEye2 checkpoint to fine-tune (published last.pth layout); "
                                            "required by `rt-mindeye calibrate`")
    model_preset: str = setting("tiny", "architecture when training from scratch", choices=("tiny", "light", "full"))
    embedder: str = setting("phantom", "image embedder: phantom (EfficientNet-Lite0) or openclip (ViT-bigG/14)",
                            choices=("phantom", "openclip"))
    openclip_checkpoint: Path | None = setting(None, "local ViT-bigG/14 weights when embedder is openclip")
    blurry_vae: Path | None = setting(None, "SD VAE weights (MindEye2's sd_image_var_autoenc.pth) for the full "
                                            "model's low-level targets (VAE latents); null: the tiny model's 28 px "
                                            "images")
    convnext_checkpoint: Path | None = setting(None, "ConvNeXt teacher weights (MindEye2's convnext_xlarge_alpha0.75"
                                                     "_fullckpt.pth) for the auxiliary low-level targets, with "
                                                     "blurry_vae")
    holdout_fraction: float = setting(0.15, "fraction of the calibration trials held out to report retrieval before the "
                                            "live runs; whole images are held out (repeated ones first), never one "
                                            "image on both sides", min=0.0, max=0.5)
    finetune_betas: str = setting(
        "realtime", "betas the model is fine-tuned on: 'realtime' replays the calibration runs through the real-time "
                    "estimator (first, last refined and end-of-run estimates: what the live decoder sees), "
                    "'offline' the offline fit's betas, 'both' the two together", choices=("realtime", "offline", "both"))
    motion_regressors: bool = setting(
        False, "give the GLM the six motion parameters as nuisance regressors (offline fit, real-time estimates and "
               "the offline reference); off by default, as in GLMsingle: after motion correction they halved the first "
               "real-time estimates' correlation with the true betas on the phantom (docs/glm.md, \"Motion regressors\")")
    exclude_motion_gated: bool = setting(True, "leave the calibration trials over the motion gate (motion.gate_fd_mm "
                                               "in their window) out of fine-tuning; the report counts them")
    ensemble_members: int = setting(
        1, "fine-tune this many models (seeds train.seed, train.seed + 1, ...; train.time_budget_min is split evenly "
           "between them) and decode with the mean of their normalised outputs; with little calibration data the "
           "fine-tune's own seed moves retrieval as much as any setting, and the mean of several short fine-tunes "
           "beat one long one (docs/model.md). Each member is a full model in the decoder's memory", min=1, max=16)
    glm: GLMConfig = field(default_factory=GLMConfig, metadata={"doc": "offline GLM of the calibration runs"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**FINETUNE),
                               metadata={"doc": "fine-tuning (time_budget_min plans the epochs)"})
