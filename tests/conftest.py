"""Suite-wide settings: CPU-only, one torch thread, no hub downloads, shared test-data paths."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
REPO_ROOT = TESTS_DIR.parent


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def siemens_export_dir() -> Path:
    """Eleven real Siemens real-time export mosaics (series 13) and one truncated copy."""
    return DATA_DIR / "siemens_rt_export"


@pytest.fixture(scope="session")
def mindeye2_layout_dir() -> Path:
    return DATA_DIR / "mindeye2_layout"
