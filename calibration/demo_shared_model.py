"""Make the shared model `rt-mindeye demo` ships (rt_mindeye/data/demo_shared_model.pth and its .json).

    python calibration/demo_shared_model.py --epochs 14 --seed 1

Pretrains the tiny MindEye2 model on the demo's pretraining subjects with the demo's recipe
(rt_mindeye.runtime.demo.pretrain_recipe) for a fixed number of epochs, then writes its weights in float16 with the
recipe beside them. Run it again whenever the recipe changes: tests/session/test_demo_shared_model.py fails until
the shipped file matches. See docs/model.md ("The demo's shared model").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rt_mindeye.runtime.demo import SHIPPED_SHARED_MODEL, write_shipped_shared_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=SHIPPED_SHARED_MODEL)
    args = parser.parse_args(argv)
    path = write_shipped_shared_model(args.out, epochs=args.epochs, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
