"""Loading memory of the real-size checkpoints: peak RSS against the model's float16 size.

Run from the repository root::

    python bench/load.py --workdir /path/with/15GB/free    # light, full and unCLIP (builds the files once)
    python bench/load.py --quick                             # tiny layouts, seconds

For each checkpoint it writes (once, streaming: never more than one 64 M-element chunk in memory) a real-size file
with random float16 weights in the published layout:

- ``light`` / ``full``: MindEye2 ``last.pth`` containers with exactly the keys and shapes of
  ``tests/data/mindeye2_layout/{multisubject_subj01_1024hid_nolow_300ep,final_multisubject_subj01}.json`` (the layouts
  obtained by instantiating the original classes; the schedule buffers and rotary frequencies take their real values
  from ``deterministic_tensors.json``);
- ``unclip``: MindEye2's SDXL-unCLIP in the generative-models layout (``model.diffusion_model.*`` UNet,
  ``first_stage_model.*`` VAE), keys and shapes from the real-size configs through the inverse conversion tables. The
  published file also holds the 1.8 B-parameter OpenCLIP conditioner, which the loader drops without reading; it is
  left out here to save 3.7 GB of disk.

Then it loads each one in a fresh process with ``rt-mindeye model check CKPT --load --json --dtype float16`` (the
decoder's precision on a GPU host; on a CPU it builds the same float16 modules), one at a time, and reports the
peak RSS over the interpreter's baseline against the float16 size (target: at most 1.3x). Prints a table and writes
``bench/results/load.json``. Memory is shared with other jobs: the full checkpoint needs about 5.5 GB free.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

LAYOUT_DIR = REPO / "tests" / "data" / "mindeye2_layout"
RESULTS = REPO / "bench" / "results" / "load.json"
CHUNK = 64 << 20  # elements generated at once
TARGET_RATIO = 1.3
LAYOUTS = {"light": "multisubject_subj01_1024hid_nolow_300ep", "full": "final_multisubject_subj01"}


def mindeye2_layout(name: str) -> tuple[dict[str, tuple[int, ...]], dict[str, list[float]]]:
    layout = json.loads((LAYOUT_DIR / f"{LAYOUTS[name]}.json").read_text())["state_dict"]
    fixed = json.loads((LAYOUT_DIR / "deterministic_tensors.json").read_text())
    values = dict(fixed["noise_scheduler_buffers"])
    for key in fixed["rotary_emb_freqs"]["keys"]:
        values[key] = fixed["rotary_emb_freqs"]["values"]
    return {k: tuple(v) for k, v in layout.items()}, values


def unclip_layout() -> dict[str, tuple[int, ...]]:
    from rt_mindeye.convert.unclip import LDM_UNET_PREFIX, LDM_VAE_PREFIX, unet_to_ldm, vae_to_ldm
    from rt_mindeye.decode.unclip import SD_VAE_CONFIG, UNCLIP_UNET_CONFIG
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNCLIP_UNET_CONFIG)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    shapes = {LDM_UNET_PREFIX + k: tuple(v.shape) for k, v in unet_to_ldm(unet.state_dict(), UNCLIP_UNET_CONFIG).items()}
    vae_sd = vae_to_ldm(vae.state_dict(), SD_VAE_CONFIG)
    shapes.update({LDM_VAE_PREFIX + k: tuple(v.shape) for k, v in vae_sd.items()})
    return shapes


def tiny_layouts() -> dict[str, dict[str, tuple[int, ...]]]:
    from rt_mindeye.model.config import MindEyeConfig
    from rt_mindeye.model.mindeye import build_model

    light = build_model(MindEyeConfig.preset("light", [300, 200], hidden_dim=64, token_seq=16, token_dim=64,
                                             prior_depth=1, prior_dim_head=16, prior_heads=4), "meta")
    return {"light": {k: tuple(v.shape) for k, v in light.state_dict().items()}}


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], values: dict[str, list[float]], *,
                     container: str, seed: int = 0, dtype: str = "float16") -> Path:
    """A torch zip checkpoint of random ``dtype`` tensors, written without holding them in memory: the tensors are
    generated chunk by chunk into one raw scratch file, then saved from a zero-copy memory map of it."""
    np_dtype = np.dtype(dtype)
    raw = path.with_suffix(".raw")
    generator = torch.Generator().manual_seed(seed)
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    with open(raw, "wb") as f:
        for key, shape in shapes.items():
            n = int(np.prod(shape)) if shape else 1
            if key in values:
                f.write(np.asarray(values[key], dtype=np_dtype).tobytes())
            else:
                for start in range(0, n, CHUNK):
                    count = min(CHUNK, n - start)
                    f.write((torch.randn(count, generator=generator) * 0.02).numpy().astype(np_dtype).tobytes())
            offsets[key] = (position, n)
            position += n
    mapped = np.memmap(raw, dtype=np_dtype, mode="r")
    state = {k: torch.from_numpy(np.asarray(mapped[o:o + n])).reshape(shapes[k]) for k, (o, n) in offsets.items()}
    payload = {"state_dict": state} if container == "lightning" else {
        "epoch": 0, "model_state_dict": state, "optimizer_state_dict": {}, "lr_scheduler": {}, "train_losses": [],
        "test_losses": [], "lrs": []}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    del state, mapped
    raw.unlink()
    return path


def measure(path: Path, dtype: str = "float16") -> dict:
    """``rt-mindeye model check --load`` in a fresh process (its own peak RSS)."""
    command = [sys.executable, "-m", "rt_mindeye", "model", "check", str(path), "--load", "--json", "--dtype", dtype]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["load"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_load",
                        help="where the real-size checkpoints are built (kept for reruns; ~12 GB)")
    parser.add_argument("--only", nargs="+", choices=("light", "full", "unclip"), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny layout only (smoke run)")
    parser.add_argument("--file-dtype", default="float16", choices=("float16", "float32"),
                        help="precision of the written checkpoints (published files are probably float16; a float32 "
                             "file checks that converting while loading stays within the budget)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(width=140)
    args.workdir.mkdir(parents=True, exist_ok=True)

    if args.quick:
        plan = {"light-tiny": (tiny_layouts()["light"], mindeye2_layout("light")[1], "mindeye2")}
        # the tiny light layout's prior has 1 layer: keep only the fixed values whose keys exist
        plan = {k: (s, {n: v for n, v in val.items() if n in s}, c) for k, (s, val, c) in plan.items()}
    else:
        names = args.only or ["light", "full", "unclip"]
        plan = {}
        for name in names:
            if name == "unclip":
                plan[name] = (unclip_layout(), {}, "lightning")
            else:
                shapes, values = mindeye2_layout(name)
                plan[name] = (shapes, values, "mindeye2")

    rows = []
    for name, (shapes, values, container) in plan.items():
        stem = name if args.file_dtype == "float16" else f"{name}-{args.file_dtype}"
        path = args.workdir / (f"{stem}.ckpt" if container == "lightning" else f"{stem}_last.pth")
        if not path.exists():
            started = time.perf_counter()
            console.print(f"building {path} ({sum(int(np.prod(s)) for s in shapes.values()) / 1e9:.2f} B numbers)")
            write_checkpoint(path, shapes, values, container=container, dtype=args.file_dtype)
            console.print(f"  built in {time.perf_counter() - started:.0f} s")
        report = measure(path)
        report.update(name=stem, file_bytes=path.stat().st_size, file_dtype=args.file_dtype)
        rows.append(report)
        console.print(f"{name}: peak over baseline {report['peak_over_baseline_bytes'] / 1e9:.2f} GB, "
                      f"fp16 size {report['fp16_bytes'] / 1e9:.2f} GB, ratio {report['peak_over_fp16']:.2f}")

    table = Table(title=f"loading as the decoder does (float16): peak RSS over the interpreter's baseline vs the "
                        f"model's float16 size (target <= {TARGET_RATIO}x)")
    for column in ("checkpoint", "parameters", "file GB", "fp16 GB", "baseline GB", "peak - baseline GB", "ratio",
                   "seconds", "within target"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["name"], f"{row['parameters'] / 1e9:.3f} B", f"{row['file_bytes'] / 1e9:.2f}",
                      f"{row['fp16_bytes'] / 1e9:.2f}", f"{row['baseline_rss_bytes'] / 1e9:.2f}",
                      f"{row['peak_over_baseline_bytes'] / 1e9:.2f}", f"{row['peak_over_fp16']:.2f}",
                      f"{row['seconds']:.1f}", "yes" if row["peak_over_fp16"] <= TARGET_RATIO else "NO")
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"quick": args.quick, "target_ratio": TARGET_RATIO, "rows": rows}, indent=2))
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
