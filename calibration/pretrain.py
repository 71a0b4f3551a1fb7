"""Pretrain the shared MindEye2 model across subjects (thin entry point for ``rt-mindeye pretrain``).

    python calibration/pretrain.py --out runs/pretrain --phantom-subjects 1 2 3 4
    python calibration/pretrain.py --out runs/pretrain --preset light --data s1.npz s2.npz --config train.yaml

    python calibration/pretrain.py --out runs/pre2 --phantom-subjects 2 3 --nproc 2    # 2 processes (DDP)
    torchrun --nproc-per-node 8 calibration/pretrain.py --out runs/full --preset full --data s*.npz

See docs/model.md and docs/distributed.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rt_mindeye.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
