"""Training on several processes: a 2-process gloo run computes what one process computes with the same global batch.

All distributed jobs run in one launch of 2 real worker processes (torch's elastic launcher, as ``--nproc`` uses);
the single-process references run here. Tolerances (docs/distributed.md):

- losses, per step: relative difference <= LOSS_RTOL. What differs is floating-point summation order only (each
  rank sums its shard, then the ranks' sums are averaged; matrix products over smaller batches), ~1e-7 relative.
- weights: every parameter that some output depends on is within WEIGHT_ATOL of the single-process one.
  Parameters no output depends on (MindEye2's overwritten ``mixer_blocks1``, LayerNorm(1) gains, biases cancelled
  by a one-channel GroupNorm group) have an exact gradient of zero; they receive rounding noise only, which AdamW
  normalises into steps of +-lr, so they drift differently in any two runs that sum in another order. They are
  found by their float64 gradient, excluded from the weight check, and the models' outputs are compared instead
  (relative difference <= OUTPUT_RTOL).
- a control run that differs only in its random draws (another seed) must miss both tolerances by far, so the
  tolerances can tell a faithful distributed run from a plausible-looking different one.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rt_mindeye
from rt_mindeye.cli import main
from rt_mindeye.convert.mindeye2 import check_checkpoint, save_container
from rt_mindeye.model.distributed import DistributedError, GlobalBatchDraws, TrainingJob, run_jobs, shard_layout
from rt_mindeye.model.mindeye import MindEyeModule
from rt_mindeye.model.train import TrainConfig, Trainer, finetune, pretrain, training_forward

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
OUTPUT_RTOL = 1e-4  # outputs pass the low-level decoder, whose one-channel GroupNorms amplify rounding
# 4 epochs of 3 steps: 2 with BiMixCo (mixing partners across the two ranks' shards), 2 with SoftCLIP.
SETTINGS = TrainConfig(epochs=4, batch_size=16, max_lr=3e-3, seed=7, warmup_epochs=1.0, mixup_pct=0.5)


def _reference(config, data, settings, path, validation=None):
    torch.manual_seed(settings.seed)
    model = MindEyeModule(config)
    return model, pretrain(model, data, settings, checkpoint_path=path, validation=validation, progress=False)


@pytest.fixture(scope="module")
def runs(micro, subject_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    blurry_config = micro((20, 24), blurry=True)  # the low-level head: gathered latents and auxiliary tokens
    config = micro((20, 24))
    blurry_data = [subject_data(48, 20, 1, blurry_config, "s1"), subject_data(48, 24, 2, blurry_config, "s2")]
    data = [subject_data(48, 20, 1, config, "s1"), subject_data(48, 24, 2, config, "s2")]
    held_out = subject_data(24, 20, 11, config, "s1 held out")

    ref = {"ddp": _reference(blurry_config, blurry_data, SETTINGS, tmp / "ref_ddp.pth")[0]}
    ref["fsdp"], ref_fsdp_result = _reference(config, data, SETTINGS, tmp / "ref_fsdp.pth", validation=held_out)
    control, _ = _reference(config, data, dataclasses.replace(SETTINGS, seed=8), tmp / "control.pth")

    # A single-process run stopped after epoch 2 (checkpoint every 2), to be resumed by 2 processes.
    torch.manual_seed(SETTINGS.seed)
    interrupted = MindEyeModule(config)
    original = Trainer._train_epoch

    def stop_after_two(self, *args, **kwargs):
        if args[1] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_train_epoch", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            Trainer(interrupted, dataclasses.replace(SETTINGS, checkpoint_every=2), tmp / "half.pth",
                    progress=False).fit(data)

    # Fine-tuning a new subject with head-only epochs first (DDP must follow the change of trainable parameters).
    pretrained = save_container(tmp / "pretrained.pth", ref["fsdp"])
    new = subject_data(32, 30, 9, config, "new")
    tune = dataclasses.replace(SETTINGS, head_only_pct=0.5)
    ref["finetune"], _ = finetune(pretrained, new, tune, checkpoint_path=tmp / "ref_finetune.pth", progress=False)

    jobs = {
        "ddp": TrainingJob(blurry_data, SETTINGS, blurry_config, checkpoint_path=tmp / "ddp.pth", strategy="ddp"),
        "fsdp": TrainingJob(data, SETTINGS, config, checkpoint_path=tmp / "fsdp.pth", strategy="fsdp",
                            validation=held_out),
        "resume_ddp": TrainingJob(data, SETTINGS, config, checkpoint_path=tmp / "resume_ddp.pth",
                                  resume_from=tmp / "half.pth", strategy="ddp"),
        "resume_fsdp": TrainingJob(data, SETTINGS, config, checkpoint_path=tmp / "resume_fsdp.pth",
                                   resume_from=tmp / "half.pth", strategy="fsdp"),
        "finetune": TrainingJob([new], tune, finetune_from=pretrained, checkpoint_path=tmp / "finetune.pth",
                                strategy="ddp"),
        "budget": TrainingJob(data, dataclasses.replace(SETTINGS, epochs=50, time_budget_min=1e-4), config,
                              strategy="ddp"),
    }
    results = run_jobs(list(jobs.values()), nproc=2)
    by_rank = {rank: dict(zip(jobs, rank_results)) for rank, rank_results in results.items()}
    return dict(tmp=tmp, ref=ref, ref_fsdp_result=ref_fsdp_result, control=control, jobs=by_rank,
                data={"ddp": blurry_data, "fsdp": data},
                configs={"ddp": blurry_config, "fsdp": config}, new=new)


def _steps(path):
    return torch.load(path, weights_only=True)["train_losses"]


def _relative(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def _inert_parameters(model: MindEyeModule, data) -> set[str]:
    """Backbone and ridge parameters no output depends on: in float64 their gradient of a random functional of the
    backbone's outputs for both subjects is zero up to rounding. (The prior computes its time embedding in fp32
    whatever the input, so it is not probed; none of its parameters is excluded from the checks.)"""
    probe = copy.deepcopy(model).double().train()
    torch.manual_seed(0)
    out, _ = training_forward(probe, [d.voxels[:8].double() for d in data], None, with_prior=False)
    functional = sum((value * torch.randn_like(value)).sum()
                     for value in (out.tokens, out.clip_voxels, out.blurry_latent, out.blurry_aux) if value is not None)
    functional.backward()
    probed = {name: p for name, p in probe.named_parameters()
              if p.requires_grad and not name.startswith("diffusion_prior.")}
    scale = max(p.grad.abs().max().item() for p in probed.values() if p.grad is not None)
    return {name for name, p in probed.items() if p.grad is None or p.grad.abs().max().item() <= 1e-9 * scale}


def _outputs(model: MindEyeModule, data):
    model.eval()
    with torch.no_grad():
        out, _ = training_forward(model, [d.voxels for d in data], None, with_prior=False)
    return [v for v in (out.tokens, out.clip_voxels, out.blurry_latent, out.blurry_aux) if v is not None]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(runs, strategy):
    """DDP runs the model with the low-level head; FSDP (sharded) the one without."""
    tmp, ref, config = runs["tmp"], runs["ref"][strategy], runs["configs"][strategy]
    job = runs["jobs"][0][strategy]
    # The loss curve, step by step, from the checkpoints rank 0 wrote.
    single, double = _steps(tmp / f"ref_{strategy}.pth"), _steps(tmp / f"{strategy}.pth")
    assert len(single) == len(double) == 12
    assert _relative(single, double) <= LOSS_RTOL
    assert [h.loss for h in job.result.history] == [h.loss for h in runs["jobs"][1][strategy].result.history]
    # The weights, except those no output depends on; then the outputs themselves.
    inert = _inert_parameters(ref, runs["data"][strategy])
    assert {n for n, _ in ref.named_parameters() if n.startswith("backbone.mixer_blocks1.")} <= inert
    assert sum(p.numel() for n, p in ref.named_parameters() if n in inert) < 0.2 * sum(
        p.numel() for p in ref.parameters())
    expected = ref.state_dict()
    worst = max((expected[k] - v).abs().max().item() for k, v in job.state_dict.items() if k not in inert)
    assert worst <= WEIGHT_ATOL
    trained = MindEyeModule(config)
    trained.load_state_dict(job.state_dict)
    for a, b in zip(_outputs(ref, runs["data"][strategy]), _outputs(trained, runs["data"][strategy])):
        torch.testing.assert_close(b, a, rtol=OUTPUT_RTOL, atol=OUTPUT_RTOL * a.abs().max().item())


def test_validation_after_each_epoch_is_the_single_process_one(runs):
    """Scored on every rank (under FSDP every rank must take part in the forward), after each epoch."""
    expected = [h.val_top1 for h in runs["ref_fsdp_result"].history]
    assert None not in expected
    for rank in (0, 1):
        assert [h.val_top1 for h in runs["jobs"][rank]["fsdp"].result.history] == expected


def test_a_run_with_other_random_draws_misses_the_tolerances_by_far(runs):
    """The control: same data, same model, another seed (what ranks drawing their own dropout and noise give)."""
    tmp, ref, control = runs["tmp"], runs["ref"]["fsdp"], runs["control"]
    assert _relative(_steps(tmp / "ref_fsdp.pth"), _steps(tmp / "control.pth")) > 100 * LOSS_RTOL
    inert = _inert_parameters(ref, runs["data"]["fsdp"])
    expected, other = ref.state_dict(), control.state_dict()
    assert max((expected[k] - other[k]).abs().max().item() for k in expected if k not in inert) > 100 * WEIGHT_ATOL
    assert max(((a - b).abs().max() / a.abs().max()).item()
               for a, b in zip(_outputs(ref, runs["data"]["fsdp"]), _outputs(control, runs["data"]["fsdp"]))) \
        > 100 * OUTPUT_RTOL


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_single_process_checkpoint_resumes_exactly_in_two_processes(runs, strategy):
    tmp, ref = runs["tmp"], runs["ref"]["fsdp"]
    job = runs["jobs"][0][f"resume_{strategy}"]
    assert [h.epoch for h in job.result.history] == [2, 3]
    assert _relative(_steps(tmp / "ref_fsdp.pth"), _steps(tmp / f"resume_{strategy}.pth")) <= LOSS_RTOL
    inert = _inert_parameters(ref, runs["data"]["fsdp"])
    expected = ref.state_dict()
    assert max((expected[k] - v).abs().max().item() for k, v in job.state_dict.items() if k not in inert) \
        <= WEIGHT_ATOL


def test_rank_zero_writes_the_single_process_checkpoint_layout(runs):
    tmp = runs["tmp"]
    single = torch.load(tmp / "ref_fsdp.pth", weights_only=True)
    for name in ("fsdp.pth", "ddp.pth"):
        report = check_checkpoint(tmp / name)
        assert report.config == runs["configs"][name[:-4]]
    sharded = torch.load(tmp / "fsdp.pth", weights_only=True)
    assert sharded.keys() == single.keys() and sharded["epoch"] == single["epoch"] == 4
    assert list(sharded["model_state_dict"]) == list(single["model_state_dict"])
    ours, theirs = sharded["optimizer_state_dict"], single["optimizer_state_dict"]
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
    assert ours["state"].keys() == theirs["state"].keys()
    inert = _inert_parameters(runs["ref"]["fsdp"], runs["data"]["fsdp"])
    names = [n for n, p in runs["ref"]["fsdp"].named_parameters() if p.requires_grad]
    live = [i for i, n in enumerate(names) if n not in inert]
    for i in live:  # the gathered AdamW moments are the single-process ones
        torch.testing.assert_close(ours["state"][i]["exp_avg"], theirs["state"][i]["exp_avg"], rtol=1e-3,
                                   atol=1e-6)


def test_finetune_with_head_only_epochs_matches(runs):
    """The shared parts are frozen for 2 epochs, then trained: DDP is rebuilt for each set of trainable parameters."""
    tmp, ref = runs["tmp"], runs["ref"]["finetune"]
    job = runs["jobs"][0]["finetune"]
    assert _relative(_steps(tmp / "ref_finetune.pth"), _steps(tmp / "finetune.pth")) <= LOSS_RTOL
    inert = _inert_parameters(ref, [runs["new"]])
    expected = ref.state_dict()
    assert max((expected[k] - v).abs().max().item() for k, v in job.state_dict.items() if k not in inert) \
        <= WEIGHT_ATOL


def test_the_time_budget_is_planned_from_the_slowest_rank(runs):
    first, second = runs["jobs"][0]["budget"].result, runs["jobs"][1]["budget"].result
    assert first.step_seconds == second.step_seconds > 0
    assert first.epochs == second.epochs == 1  # 6 ms cannot hold more than one epoch


# -- pieces, without processes ---------------------------------------------------------------------------------------


def test_shard_layout_cuts_every_subject_and_puts_the_rows_back_in_order():
    sizes = (6, 4)
    rows = [shard_layout(sizes, 2, rank)[0] for rank in range(2)]
    assert rows[0].tolist() == [0, 1, 2, 6, 7] and rows[1].tolist() == [3, 4, 5, 8, 9]
    order = shard_layout(sizes, 2, 0)[1]
    assert torch.equal(torch.cat(rows)[order], torch.arange(10))
    with pytest.raises(DistributedError, match="divisible by 4"):
        shard_layout((6, 4), 4, 0)


def test_draws_for_the_global_batch_are_the_single_process_draws():
    """Each rank's rows of every draw equal the single-process draw's rows (dropout bitwise as torch's CPU one)."""
    x = torch.randn(10, 3, 5)
    rows = torch.tensor([3, 4, 5, 8, 9])

    def draws():
        return (F.dropout(x, 0.3, True), torch.randn_like(x), torch.randint(0, 100, (len(x),)),
                torch.rand(len(x)), torch.randn(len(x), 2), torch.randint(7, size=(len(x), 2)))

    torch.manual_seed(0)
    single = draws()
    torch.manual_seed(0)
    with GlobalBatchDraws(torch.arange(10), 10):
        whole = draws()
    for a, b in zip(single, whole):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    with GlobalBatchDraws(rows, 10):
        mine = (F.dropout(x[rows], 0.3, True), torch.randn_like(x[rows]), torch.randint(0, 100, (5,)),
                torch.rand(5), torch.randn(5, 2), torch.randint(7, size=(5, 2)))
    for a, b in zip(single, mine):
        assert torch.equal(a[rows], b)
    assert torch.get_rng_state().equal(_state_after(draws))  # every rank's RNG stays in step with one process
    with GlobalBatchDraws(rows, 10), pytest.raises(DistributedError, match="first dimension"):
        torch.randn(7, 2)
    with GlobalBatchDraws(rows, 10), pytest.raises(DistributedError, match="cannot be drawn"):
        torch.randn(5, 2).bernoulli_(0.5)


def _state_after(fn):
    torch.manual_seed(0)
    fn()
    return torch.get_rng_state()


def test_under_torchrun_the_number_of_processes_is_torchruns(monkeypatch, tmp_path, capsys):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["pretrain", "--phantom-subjects", "2", "--out", str(tmp_path), "--nproc", "2"]) == 2
    assert "leave --nproc out" in capsys.readouterr().err


# -- the command -----------------------------------------------------------------------------------------------------


def test_pretrain_command_with_two_processes_writes_a_checkpoint_that_model_check_accepts(tmp_path, capsys):
    out = tmp_path / "run"
    root = str(Path(rt_mindeye.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "rt_mindeye", "pretrain", "--phantom-subjects", "2", "3", "--preset", "tiny",
               "--epochs", "1", "--nproc", "2", "--out", str(out), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes on cpu, DDP" in done.stdout
    assert done.stdout.count("pretrained 2 subjects") == 1  # only rank 0 reports
    assert main(["model", "check", str(out / "last.pth")]) == 0
    assert "OK: every key and shape fits" in capsys.readouterr().out
