"""Repeat averaging at decode time (decoder.average_repeats): the decoder decodes each repeated image's average over
its trials' newest estimates so far, marks the result as averaged, keeps its history across a restart, and never
mixes two bundles' betas. Real model and candidates from the calibrated phantom's bundle."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.console.state import ConsoleState, apply
from rt_mindeye.decode.config import DecodeConfig
from rt_mindeye.runtime.decoder import RepeatAverager, TrialDecoder, build_decoder
from rt_mindeye.transport.messages import TrialBetas


@pytest.fixture(scope="module")
def decoder(calibrated_phantom):
    bundle = CalibrationBundle.open(calibrated_phantom.bundle_dir)
    return build_decoder(bundle, DecodeConfig(), device="cpu")[0], len(bundle.decoder_index())


def _estimate(n_voxels: int, trial: int, image: str, version: int = 5, seed: int | None = None,
              bundle_id: str = "A", run: int = 3) -> TrialBetas:
    rng = np.random.default_rng(trial if seed is None else seed)
    return TrialBetas(session="test", run=run, trial=trial, trial_type="image", onset=4.0 * trial,
                      estimate_kind="early", estimate_version=version, n_volumes=version, acquisition_time=time.time(),
                      betas=rng.standard_normal(n_voxels).astype(np.float32), stim_file=f"stimuli/{image}",
                      bundle_id=bundle_id)


def test_averaged_result_decodes_the_mean_of_the_images_trials(decoder, tmp_path):
    model, n = decoder
    trials = TrialDecoder(model, session="test", recon_dir=None, averager=RepeatAverager(tmp_path / "r.journal"))
    first, other, second = _estimate(n, 0, "a.png"), _estimate(n, 1, "b.png"), _estimate(n, 2, "a.png")
    assert trials.average(first, time.time()) is None  # first showing: nothing to average
    assert trials.average(other, time.time()) is None
    averaged = trials.average(second, time.time())
    assert averaged.averaged and averaged.n_repeats == 2 and averaged.repeat_trials == ((3, 0), (3, 2))
    single = trials.retrieve(second, time.time()).result
    assert not single.averaged and single.n_repeats == 1
    reference = model.decode((first.betas + second.betas) / 2)
    assert averaged.topk_labels == tuple(reference.topk_ids[0])
    assert averaged.topk_scores == pytest.approx(tuple(float(s) for s in reference.scores[0]), abs=1e-5)
    assert averaged.topk_labels != single.topk_labels or averaged.topk_scores != single.topk_scores

    # A newer estimate of a trial replaces its older one in the average; a third showing joins it.
    refined = _estimate(n, 0, "a.png", version=9, seed=99)
    again = trials.average(refined, time.time())
    assert again.n_repeats == 2
    assert again.topk_labels == tuple(model.decode((refined.betas + second.betas) / 2).topk_ids[0])
    assert trials.average(_estimate(n, 7, "a.png"), time.time()).n_repeats == 3

    # The console shows the average beside the trial's own result, not instead of it.
    state = apply(apply(ConsoleState(), single, now=time.time()), averaged, now=time.time())
    row = state.trial(3, 2)
    assert [r.label for r in row.topk] == list(single.topk_labels)
    assert [r.label for r in row.averaged_topk] == list(averaged.topk_labels) and row.n_repeats == 2
    assert state.latency("retrieval") and len(state.latency("retrieval")) == 1  # the average adds no latency sample


def test_history_survives_a_restart_and_bundles_are_not_mixed(decoder, tmp_path):
    _, n = decoder
    journal = tmp_path / "repeats.journal"
    averager = RepeatAverager(journal)
    averager.add(_estimate(n, 0, "a.png"))
    averager.add(_estimate(n, 1, "b.png"))
    averager.close()  # the decoder restarts
    restarted = RepeatAverager(journal)
    mean, trials = restarted.add(_estimate(n, 4, "a.png"))
    assert trials == ((3, 0), (3, 4))
    np.testing.assert_allclose(mean, (_estimate(n, 0, "a.png").betas + _estimate(n, 4, "a.png").betas) / 2,
                               rtol=1e-6)
    # Betas made with another calibration bundle (after a reload) are averaged only among themselves.
    assert restarted.add(_estimate(n, 0, "a.png", bundle_id="B", run=4)) is None
    assert restarted.add(_estimate(n, 6, "a.png", bundle_id="B", run=4))[1] == ((4, 0), (4, 6))
    # A trial without a known image is never averaged.
    anonymous = _estimate(n, 9, "a.png")
    assert restarted.add(TrialBetas(**{**anonymous.__dict__, "stim_file": None})) is None
    restarted.close()
