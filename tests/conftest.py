"""Suite-wide settings: CPU by default, one torch thread, no hub downloads, shared test-data paths.

GPUs are hidden from the suite unless ``RT_MINDEYE_GPU_TESTS=1``: CI and the CPU machines run everything on the CPU
(deterministic, like the results the tests pin), and on a GPU host ``RT_MINDEYE_GPU_TESTS=1 python -m pytest -m gpu``
runs the GPU paths (float16, torch.compile, TensorRT where installed, retrieval and training on CUDA); the tests
marked ``gpu`` are skipped, saying so, where no GPU is visible.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
GPU_TESTS = os.environ.get("RT_MINDEYE_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
REPO_ROOT = TESTS_DIR.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with RT_MINDEYE_GPU_TESTS=1 on a GPU host)")
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
