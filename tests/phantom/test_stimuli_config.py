"""Stimulus sequence and configuration validation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from rt_mindeye.errors import ConfigError
from rt_mindeye.phantom.config import PRESETS, phantom_config
from rt_mindeye.phantom.stimuli import BASE_IMAGES, render, render_all, save_stimuli, stimulus, stimulus_set


def test_stimuli_are_deterministic_distinct_and_varied():
    stimuli = stimulus_set(60)
    first = render_all(stimuli)
    again = render_all(stimulus_set(60))
    assert first.shape == (60, 224, 224, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    digests = {hashlib.sha1(image.tobytes()).hexdigest() for image in first}
    assert len(digests) == 60
    kinds = {s.kind for s in stimuli}
    assert kinds == {"photo", "variant", "grating", "shapes"}
    assert [s.name for s in stimuli[:len(BASE_IMAGES)]] == list(BASE_IMAGES)
    # Images are not blank and differ in colour content.
    assert (first.reshape(60, -1).std(axis=1) > 5).all()
    assert np.ptp(first[..., 0].mean(axis=(1, 2)) - first[..., 2].mean(axis=(1, 2))) > 50


def test_a_stimulus_does_not_depend_on_the_set_size():
    np.testing.assert_array_equal(render(stimulus(97)), render(stimulus_set(300)[97]))
    assert stimulus(500).name != stimulus(501).name


def test_save_stimuli_roundtrip(tmp_path):
    stimuli = stimulus_set(3)
    paths = save_stimuli(stimuli, tmp_path)
    assert [p.name for p in paths] == [s.file_name for s in stimuli]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), render(stimuli[1]))


def test_presets_and_overrides():
    cfg = phantom_config("small", n_runs=5, motion_max_mm=0.0)
    assert cfg.n_runs == 5 and cfg.motion_max_mm == 0.0 and cfg.matrix == PRESETS["small"].matrix
    real = PRESETS["realistic"]
    assert real.tr_s == 1.5 and real.trials_per_run == 63 and real.n_runs == 11 and real.voxel_size_mm == (2, 2, 2)
    assert real.n_images >= 500


@pytest.mark.parametrize("overrides, key", [
    ({"tr_s": -1.0}, "tr_s"),
    ({"n_runs": "three"}, "n_runs"),
    ({"nonsense": 1}, "nonsense"),
    ({"calibration_runs": 9}, "phantom"),
])
def test_invalid_overrides_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        phantom_config("small", **overrides)
    assert key in info.value.key


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        phantom_config("huge")
