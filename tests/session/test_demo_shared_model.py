"""The shared model `rt-mindeye demo` ships: made with the demo's current recipe, taken only by a demo with that
recipe, and loadable for fine-tuning a new subject in float32."""

from __future__ import annotations

import io
import json

import torch
from rich.console import Console

from rt_mindeye.convert.mindeye2 import load_mindeye2
from rt_mindeye.model.embedders import PhantomEmbedder
from rt_mindeye.runtime.demo import (SHIPPED_SHARED_MODEL, DemoOptions, _pretrain, demo_phantom_config,
                                     pretrain_recipe, shipped_shared_model)


def test_the_shipped_shared_model_was_made_with_the_demos_recipe():
    info = json.loads(SHIPPED_SHARED_MODEL.with_suffix(".json").read_text())
    assert info["recipe"] == pretrain_recipe(demo_phantom_config()), \
        "the demo's recipe changed: regenerate the model with `python calibration/demo_shared_model.py`"
    assert shipped_shared_model(demo_phantom_config()) == SHIPPED_SHARED_MODEL


def test_a_demo_with_another_phantom_does_not_take_the_shipped_model():
    assert shipped_shared_model(demo_phantom_config(visual_voxels=4000)) is None
    # More runs move the pretraining subjects' images (they start after the session's own).
    assert shipped_shared_model(demo_phantom_config(n_runs=demo_phantom_config().n_runs + 1)) is None


def test_the_demo_copies_the_shipped_model_into_its_run_folder(tmp_path):
    out = Console(file=io.StringIO())
    checkpoint = _pretrain(demo_phantom_config(), tmp_path / "shared_model", DemoOptions(out=tmp_path), out)
    assert checkpoint.read_bytes() == SHIPPED_SHARED_MODEL.read_bytes()
    assert json.loads((tmp_path / "shared_model" / "recipe.json").read_text())["recipe"] == \
        pretrain_recipe(demo_phantom_config())


def test_the_shipped_model_fine_tunes_a_new_subject_in_float32():
    loaded = load_mindeye2(SHIPPED_SHARED_MODEL, new_subject_voxels=123, dtype=torch.float32)
    assert sorted(loaded.initialised) == ["ridge.linears.0.bias", "ridge.linears.0.weight"]
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    with torch.no_grad():
        clip = loaded.model(torch.randn(2, 123), 0).clip_voxels
    assert tuple(clip.shape[1:]) == tuple(PhantomEmbedder().tokens_shape) and torch.isfinite(clip).all()
