"""Training: loss goes down, runs are reproducible, a resumed run continues identically, budgets plan epochs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rt_mindeye.convert.mindeye2 import load_mindeye2, save_container
from rt_mindeye.errors import ConfigError
from rt_mindeye.model.losses import mixco, mixco_nce, soft_clip_loss, soft_clip_temperature
from rt_mindeye.model.mindeye import MindEyeModule
from rt_mindeye.model.train import TrainConfig, Trainer, finetune, plan_epochs, pretrain, split_global_batch

FAST = TrainConfig(epochs=6, batch_size=16, max_lr=3e-3, seed=7, warmup_epochs=1.0)


def _setup(micro, subject_data, blurry=False, n=48):
    config = micro((20, 24), blurry=blurry)
    data = [subject_data(n, 20, 1, config, "s1"), subject_data(n, 24, 2, config, "s2")]
    torch.manual_seed(0)
    return config, data


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pretraining_reduces_the_loss_and_is_deterministic(micro, subject_data):
    config, data = _setup(micro, subject_data)
    torch.manual_seed(0)
    first = MindEyeModule(config)
    torch.manual_seed(0)
    second = MindEyeModule(config)
    a = pretrain(first, data, FAST, progress=False)
    b = pretrain(second, data, FAST, progress=False)
    assert a.epochs == 6 and a.steps_per_epoch == 3
    losses = [h.loss for h in a.history]
    assert losses[-1] < losses[0]
    assert a.history[-1].clip_loss < a.history[0].clip_loss
    assert a.history[-1].train_top1 > 4 / 32  # 32 candidates in a two-subject batch: chance is 1/32
    assert [h.loss for h in b.history] == losses
    wa, wb = _weights(first), _weights(second)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_exactly_like_an_uninterrupted_run(micro, subject_data, tmp_path, monkeypatch):
    config, data = _setup(micro, subject_data)
    settings = dataclasses.replace(FAST, epochs=4)
    torch.manual_seed(0)
    straight = MindEyeModule(config)
    pretrain(straight, data, settings, progress=False)

    # Run 4 epochs with a checkpoint every 2 and "crash" at the start of the third epoch.
    torch.manual_seed(0)
    interrupted = MindEyeModule(config)
    original = Trainer._train_epoch
    epochs_run = []

    def crash_after_two(self, *args, **kwargs):
        if len(epochs_run) == 2:
            raise KeyboardInterrupt
        epochs_run.append(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, dataclasses.replace(settings, checkpoint_every=2), tmp_path / "last.pth",
                progress=False).fit(data)
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 2

    resumed = MindEyeModule(config)
    result = Trainer(resumed, settings, tmp_path / "last.pth", progress=False).fit(
        data, resume_from=tmp_path / "last.pth")
    assert [h.epoch for h in result.history] == [2, 3]
    ws, wr = _weights(straight), _weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)

    with pytest.raises(ConfigError):  # resuming with other training settings is refused
        Trainer(MindEyeModule(config), dataclasses.replace(settings, max_lr=1.0), progress=False).fit(
            data, resume_from=tmp_path / "last.pth")


def test_finetune_a_new_subject_from_a_pretrained_checkpoint(micro, subject_data, tmp_path):
    """With the low-level head, so its L1 and auxiliary losses are exercised too."""
    config, data = _setup(micro, subject_data, blurry=True, n=32)
    torch.manual_seed(0)
    pretrained = MindEyeModule(config)
    pretrain(pretrained, data, dataclasses.replace(FAST, epochs=1), progress=False)
    path = save_container(tmp_path / "pre.pth", pretrained)
    new = subject_data(32, 30, 9, config, "new")
    model, result = finetune(path, new, dataclasses.replace(FAST, epochs=3, mixup_pct=0.5), progress=False)
    assert all(h.blur_loss > 0 for h in result.history)
    assert model.config.subject_voxels == (30,)
    assert result.history[-1].loss < result.history[0].loss
    shared = pretrained.state_dict()
    tuned = model.state_dict()
    assert not torch.equal(shared["backbone.backbone_linear.weight"], tuned["backbone.backbone_linear.weight"])


def test_head_only_epochs_train_the_new_ridge_head_and_leave_the_shared_parts_untouched(micro, subject_data, tmp_path):
    config, data = _setup(micro, subject_data, n=32)
    torch.manual_seed(0)
    pretrained = MindEyeModule(config)
    path = save_container(tmp_path / "pre.pth", pretrained)
    shared = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("ridge.")}
    new = subject_data(32, 30, 9, config, "new")

    frozen, _ = finetune(path, new, dataclasses.replace(FAST, epochs=2, head_only_pct=1.0), progress=False)
    after = frozen.state_dict()
    assert all(torch.equal(shared[k], after[k]) for k in shared)
    untrained = load_mindeye2(path, new_subject_voxels=30, new_subject_name="new", seed=FAST.seed).model
    assert not torch.equal(untrained.state_dict()["ridge.linears.0.weight"], after["ridge.linears.0.weight"])
    # The freeze is undone after training; parameters frozen by design (rotary frequencies) stay frozen.
    assert {k: p.requires_grad for k, p in frozen.named_parameters()} == \
        {k: p.requires_grad for k, p in untrained.named_parameters()}
    assert any(p.requires_grad for k, p in frozen.named_parameters() if k.startswith("backbone."))

    partly, result = finetune(path, new, dataclasses.replace(FAST, epochs=4, head_only_pct=0.5), progress=False)
    after = partly.state_dict()
    assert not torch.equal(shared["backbone.backbone_linear.weight"], after["backbone.backbone_linear.weight"])
    assert result.history[-1].loss < result.history[0].loss


def test_time_budget_plans_epochs_from_a_measured_step(micro, subject_data):
    config, data = _setup(micro, subject_data)
    torch.manual_seed(0)
    model = MindEyeModule(config)
    before = _weights(model)
    trainer = Trainer(model, dataclasses.replace(FAST, epochs=50, time_budget_min=1e-4), progress=False)
    step_s = trainer.measure_step_seconds(data, torch.device("cpu"), None)
    assert step_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # timing does not train
    result = trainer.fit(data)
    assert result.epochs == 1 and result.step_seconds > 0  # 6 ms cannot hold more than one epoch
    assert plan_epochs(60.0, 0.1, 10, 500) == 51
    assert plan_epochs(60.0, 0.1, 10, 20) == 20
    assert plan_epochs(0.01, 1.0, 10, 20) == 1


def test_a_run_whose_epochs_overrun_the_probe_is_shortened_and_its_schedule_still_ends(micro, subject_data,
                                                                                       monkeypatch):
    config, data = _setup(micro, subject_data)
    torch.manual_seed(0)
    trainer = Trainer(MindEyeModule(config), dataclasses.replace(FAST, epochs=40, time_budget_min=1e-4),
                      progress=False)
    monkeypatch.setattr(trainer, "measure_step_seconds", lambda *a: 1e-9)  # a probe far too optimistic
    result = trainer.fit(data)
    assert 2 <= result.epochs < 40 and len(result.history) == result.epochs
    # The shortened schedule ends where a run planned at that length from the start ends.
    torch.manual_seed(0)
    planned = Trainer(MindEyeModule(config), dataclasses.replace(FAST, epochs=result.epochs), progress=False).fit(data)
    assert result.history[-1].lr == pytest.approx(planned.history[-1].lr)
    assert trainer._replanned_epochs(5, 10, 1e-3) == 10  # within the budget: the plan stands
    budget = 1e-4 * 60 * 0.85
    assert trainer._replanned_epochs(1, 10, budget) == 2  # budget spent: one more epoch to end the schedule


def test_a_global_batch_is_split_across_the_pretraining_subjects():
    assert split_global_batch(42, 7) == 6  # MindEye2's multisubject setting
    assert split_global_batch(32, 4) == 8 and split_global_batch(32, 16) == 4  # never below the minimum


def test_loss_functions():
    g = torch.Generator().manual_seed(0)
    preds = F.normalize(torch.randn(8, 12, generator=g), dim=-1)
    targets = F.normalize(torch.randn(8, 12, generator=g), dim=-1)
    # With no mixing, BiMixCo is the symmetric InfoNCE.
    no_mix = mixco_nce(preds, targets, 0.1, torch.arange(8), torch.ones(8))
    labels = torch.arange(8)
    infonce = (F.cross_entropy(preds @ targets.T / 0.1, labels) + F.cross_entropy(targets @ preds.T / 0.1, labels)) / 2
    torch.testing.assert_close(no_mix, infonce)
    # SoftCLIP is smallest when predictions equal targets.
    assert soft_clip_loss(targets, targets, 0.05) < soft_clip_loss(preds, targets, 0.05)
    mixed, perm, betas, select = mixco(torch.randn(8, 5, generator=g), torch.Generator().manual_seed(1))
    assert torch.all(betas[~select] == 1) and torch.all((betas >= 0) & (betas <= 1))
    assert soft_clip_temperature(0, 10) == pytest.approx(0.004)
    assert soft_clip_temperature(9, 10) == pytest.approx(0.0075)
