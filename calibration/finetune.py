"""Fine-tune a pretrained MindEye2 checkpoint on a new subject (thin entry point for ``rt-mindeye finetune``).

    python calibration/finetune.py runs/pretrain/last.pth --out runs/sub-new --phantom-subject 9 --budget-min 3
    python calibration/finetune.py multisubject_subj01_1024hid_nolow_300ep/last.pth --out runs/s1 --data s1.npz

    torchrun --nproc-per-node 8 calibration/finetune.py runs/full/last.pth --out runs/s1 --data s1.npz  # FSDP

See docs/model.md and docs/distributed.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rt_mindeye.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
