"""GPU readiness in one run: real sizes, random weights, one H100 in at most 8 minutes.

Run from the repository root on the GPU host::

    python bench/gpu.py                  # real sizes (needs a CUDA GPU; ~5 min on one H100)
    python bench/gpu.py --quick          # tiny sizes on the CPU: a smoke run of every section (under a minute)
    python bench/gpu.py --skip-compile   # real sizes without the torch.compile section

Sections (each reports medians over repeated runs after a warm-up, and the peak GPU memory it allocated):

1. retrieval: one single-trial query (256 x 1664 tokens) against 1,000 and 10,000 candidates held in float16 on the
   GPU (:class:`~rt_mindeye.decode.retrieval.Retriever`), query upload and top-5 download included. Target <= 30 ms.
2. prior: the diffusion prior (depth 6, 1664 wide, 256 tokens; the same in the light and full models) sampling 20
   DDIM steps for one trial in float16, from a per-trial CPU generator as the decoder runs it.
3. unCLIP: the real-size SDXL-unCLIP UNet (2.6 B parameters, cross-attention on 256 x 1664 tokens) and the SDXL VAE
   at 768 px, float16 UNet / bfloat16 VAE, with both presets (``fast``: DPM-Solver++ 2M Karras 16 steps; ``mindeye2``:
   Euler 38 steps), CFG 5, eager and with ``torch.compile``, and with torch-tensorrt when it is installed and time is
   left. Also the whole unrefined reconstruction (prior + unCLIP + VAE) per preset. Target: fast preset <= 1.0 s.
4. fine-tune: the light model (hidden 1024, one new subject of 15,724 voxels) on 750 random trials, batch 24,
   MindEye2's loss (prior + SoftCLIP), AdamW, bf16 autocast: the second epoch's time (31 steps) projected to 150
   epochs (4,650 steps). Target <= 10 min.

Weights are random: timings are real, outputs are not images. Writes ``bench/results/gpu.json`` (``--output``) and
prints a table. A section that fails or is skipped (no time left, TensorRT not installed) says why in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rt_mindeye.decode import accel  # noqa: E402
from rt_mindeye.decode.config import DecodeConfig, ReconstructConfig  # noqa: E402
from rt_mindeye.decode.decoder import prior_seed  # noqa: E402
from rt_mindeye.decode.reconstruct import UnclipReconstructor  # noqa: E402
from rt_mindeye.decode.retrieval import Retriever  # noqa: E402
from rt_mindeye.decode.unclip import (SD_VAE_CONFIG, UNCLIP_UNET_CONFIG, tiny_unet_config,  # noqa: E402
                                      tiny_vae_config)
from rt_mindeye.model.config import MindEyeConfig  # noqa: E402
from rt_mindeye.model.mindeye import MindEyeModule  # noqa: E402
from rt_mindeye.model.prior import DiffusionPrior, cosine_schedule_tensors  # noqa: E402
from rt_mindeye.model.train import SubjectData, Trainer, TrainConfig  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gpu.json"
PRESETS = ("fast", "mindeye2")
TARGETS = {"retrieval_ms": 30.0, "fast_reconstruction_s": 1.0, "finetune_150_epochs_min": 10.0}
FINETUNE_TRIALS, FINETUNE_BATCH, FINETUNE_EPOCHS, FINETUNE_VOXELS = 750, 24, 150, 15724


class Budget:
    """Wall-clock budget of the whole run; optional sections ask whether they fit."""

    def __init__(self, seconds: float):
        self.started = time.perf_counter()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def allows(self, needed_s: float) -> bool:
        return self.left >= needed_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def timed(fn, repeats: int, device: torch.device, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        tick = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - tick) * 1e3)
    array = np.asarray(samples)
    return {"p50_ms": float(np.median(array)), "p99_ms": float(np.percentile(array, 99)),
            "min_ms": float(array.min()), "n": len(samples)}


# --- 1. retrieval -----------------------------------------------------------------------------------------------------


def bench_retrieval(counts, token_shape, repeats: int, device: torch.device) -> list[dict]:
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for n in counts:
        reset_peak(device)
        candidates = torch.randn((n, *token_shape), generator=generator, device=device, dtype=dtype)
        retriever = Retriever(candidates, device=str(device), dtype=dtype)
        query = (candidates[n // 2].float() + 0.5 * torch.randn(token_shape, device=device)).cpu().numpy()
        del candidates
        indices, _ = retriever.topk(query, k=5)
        assert int(indices[0, 0]) == n // 2, "retrieval did not find the query's own candidate"
        row = {"n_candidates": n, "tokens": list(token_shape), "dtype": str(dtype).replace("torch.", ""),
               **timed(lambda: retriever.topk(query, k=5), repeats, device, warmup=3),
               "peak_gpu_gb": peak_gb(device)}
        rows.append(row)
        del retriever
    return rows


# --- 2. prior ---------------------------------------------------------------------------------------------------------


def prior_config(quick: bool) -> MindEyeConfig:
    if quick:
        return MindEyeConfig.preset("tiny", [64])
    return MindEyeConfig.preset("light", [FINETUNE_VOXELS])


def build_prior(config: MindEyeConfig, device: torch.device, dtype: torch.dtype) -> DiffusionPrior:
    """The prior as the decoder holds it: weights in ``dtype``, the noise schedule exact in float32."""
    torch.manual_seed(0)
    with torch.device(device):
        prior = DiffusionPrior(config)
    prior = prior.to(dtype=dtype).eval().requires_grad_(False)
    for name, value in cosine_schedule_tensors(config.prior_timesteps).items():
        setattr(prior.noise_scheduler, name, value.to(device))
    return prior


def bench_prior(config: MindEyeConfig, steps: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    reset_peak(device)
    prior = build_prior(config, device, dtype)
    brain = torch.randn(1, config.token_seq, config.token_dim, device=device, dtype=dtype)

    def run():  # as BundleModel: a per-trial CPU generator, autocast when the weights are half precision
        generator = torch.Generator().manual_seed(prior_seed(0))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return prior.sample(brain, steps=steps, generator=generator)

    out = run()
    return {"steps": steps, "dtype": str(dtype).replace("torch.", ""), "finite": bool(torch.isfinite(out).all()),
            **timed(run, repeats, device), "peak_gpu_gb": peak_gb(device)}


# --- 3. unCLIP ---------------------------------------------------------------------------------------------------------


def build_unclip(quick: bool, device: torch.device):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet_config = tiny_unet_config() if quick else UNCLIP_UNET_CONFIG
    vae_config = tiny_vae_config() if quick else SD_VAE_CONFIG
    with torch.device(device):  # random weights straight on the GPU: no 10 GB float32 copy on the host
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    image_size = 16 if quick else 768
    token_shape = (5, 24) if quick else (256, 1664)
    return unet, vae, image_size, token_shape


def bench_unclip(quick: bool, device: torch.device, repeats: int, budget: Budget, skip_compile: bool,
                 prior_ms: float | None, log) -> list[dict]:
    reset_peak(device)
    unet, vae, image_size, token_shape = build_unclip(quick, device)
    tokens = torch.randn((1, *token_shape), generator=torch.Generator().manual_seed(2))
    accelerations = ["none"]
    if not skip_compile:
        accelerations.append("torch")
    if accel.available():
        accelerations.append("tensorrt")
    rows = []
    for acceleration in accelerations:
        # compile: ~2-4 min for the real UNet; TensorRT longer. Skip what does not fit the budget.
        needed = {"none": 30.0, "torch": 240.0, "tensorrt": 420.0}[acceleration] * (0.05 if quick else 1.0)
        if not budget.allows(needed):
            rows.append({"acceleration": acceleration, "skipped": f"needs ~{needed:.0f} s, {budget.left:.0f} s left"})
            continue
        base = None
        for preset in PRESETS:
            decode = DecodeConfig(preset=preset, reconstruction=ReconstructConfig(
                image_size=image_size, original_size=image_size, device=str(device), compile=acceleration))
            try:
                if base is None:  # one reconstructor (one compiled UNet) per acceleration; presets share it
                    base = UnclipReconstructor(unet, vae, config=decode.reconstruction)
                    tick = time.perf_counter()
                    base.reconstruct(tokens, steps=1, seed=0)  # compilation happens here
                    sync(device)
                    first_call_s = time.perf_counter() - tick
                recon = base.with_config(**{k: getattr(decode.reconstruction, k)
                                            for k in ("scheduler", "steps", "guidance", "unconditional")})
                recon.reconstruct(tokens, seed=1)
                outputs = []

                def run():
                    outputs.append(recon.reconstruct(tokens, seed=1))

                stats = timed(run, repeats, device, warmup=0)
                last = outputs[-1]
                row = {"acceleration": acceleration, "preset": preset, "scheduler": recon.config.scheduler,
                       "steps": recon.config.steps, "guidance": recon.config.guidance, "image_px": image_size,
                       "unet_dtype": str(recon.unet_dtype).replace("torch.", ""),
                       "vae_dtype": str(recon.vae_dtype).replace("torch.", ""), "first_call_s": first_call_s,
                       "unclip": stats,
                       "denoise_p50_ms": float(np.median([o.timings_ms["denoise_ms"] for o in outputs])),
                       "vae_p50_ms": float(np.median([o.timings_ms["vae_ms"] for o in outputs])),
                       "finite": bool(torch.isfinite(last.images).all()),
                       "reproducible": bool(torch.equal(outputs[0].images, last.images)),
                       "peak_gpu_gb": peak_gb(device)}
                if prior_ms is not None:
                    row["reconstruction_total_ms"] = prior_ms + stats["p50_ms"]
                rows.append(row)
                log(f"unCLIP {preset} ({acceleration}): {stats['p50_ms']:.0f} ms")
            except Exception as exc:  # a failing accelerator must not lose the other numbers
                rows.append({"acceleration": acceleration, "preset": preset,
                             "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})
                break
    del unet, vae
    return rows


# --- 4. fine-tune -----------------------------------------------------------------------------------------------------


def bench_finetune(quick: bool, device: torch.device) -> dict:
    reset_peak(device)
    if quick:
        config = MindEyeConfig.preset("tiny", [64], blurry_recon=False)
        trials, batch = 48, 8
    else:
        config = MindEyeConfig.preset("light", [FINETUNE_VOXELS])
        trials, batch = FINETUNE_TRIALS, FINETUNE_BATCH
    generator = torch.Generator().manual_seed(0)
    data = SubjectData(voxels=torch.randn(trials, config.subject_voxels[0], generator=generator),
                       image_tokens=torch.randn(trials, config.token_seq, config.token_dim, generator=generator),
                       name="new")
    torch.manual_seed(0)
    with torch.device(device):
        model = MindEyeModule(config)
    train = TrainConfig(epochs=2, batch_size=batch, device=str(device), mixup_pct=0.5)
    started = time.perf_counter()
    result = Trainer(model, train, progress=False).fit([data])
    total_s = time.perf_counter() - started
    epoch_s = result.history[-1].seconds  # the second epoch: warm-up and allocation are in the first
    steps = result.steps_per_epoch
    full_trials_steps = (FINETUNE_TRIALS // FINETUNE_BATCH)
    per_step = epoch_s / steps
    projected_min = per_step * full_trials_steps * FINETUNE_EPOCHS / 60
    return {"model": "tiny" if quick else "light", "parameters": sum(p.numel() for p in model.parameters()),
            "trials": trials, "batch": batch, "steps_per_epoch": steps, "epoch_s": epoch_s, "step_ms": per_step * 1e3,
            "two_epochs_s": total_s, "final_loss": result.history[-1].loss,
            "projected_steps": full_trials_steps * FINETUNE_EPOCHS, "projected_150_epochs_min": projected_min,
            "mixed_precision": str(train.mixed_precision), "peak_gpu_gb": peak_gb(device)}


# --- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke run of every section)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; optional sections that "
                                                                      "would not fit are skipped (default 450)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--compile", action="store_true", help="with --quick: include torch.compile (on a CPU "
                                                               "its C++ compilation takes minutes)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(width=150)
    budget = Budget(args.budget_s)
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]no CUDA device: run on the GPU host, or use --quick for the CPU smoke run[/red]")
        return 2
    if args.quick:
        torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 5)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    results: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "tensorrt": accel.why_unavailable() or "available"},
        "quick": args.quick, "targets": TARGETS,
    }

    def section(name, fn):
        tick = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # report and go on: one broken section must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            console.print(f"[red]{name} failed: {exc}[/red]")
        results.setdefault("section_s", {})[name] = time.perf_counter() - tick
        console.print(f"{name}: {results['section_s'][name]:.1f} s ({budget.left:.0f} s of the budget left)")

    counts = [200, 1000] if args.quick else [1000, 10000]
    token_shape = (16, 1664) if args.quick else (256, 1664)
    section("retrieval", lambda: bench_retrieval(counts, token_shape, 10 if args.quick else 50, device))
    config = prior_config(args.quick)
    section("prior", lambda: bench_prior(config, 20, repeats, device, dtype))
    prior_ms = results["prior"].get("p50_ms") if isinstance(results["prior"], dict) else None
    skip_compile = args.skip_compile or (args.quick and not args.compile)
    section("unclip", lambda: bench_unclip(args.quick, device, repeats, budget, skip_compile, prior_ms,
                                           console.print))
    section("finetune", lambda: bench_finetune(args.quick, device))
    results["total_s"] = time.perf_counter() - budget.started
    report(results, console)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {args.output} ({results['total_s']:.0f} s in all)")
    return 0


def report(results: dict, console: Console) -> None:
    table = Table(title=f"GPU readiness ({results['machine']['gpu'] or results['machine']['device']}; "
                        f"{'quick, tiny sizes' if results['quick'] else 'real sizes, random weights'})")
    for column in ("section", "setting", "p50", "p99", "peak GPU GB", "target", "met"):
        table.add_column(column, justify="right")

    judged = not results["quick"]

    def met(ok: bool) -> str:
        return ("yes" if ok else "NO") if judged else "n/a (tiny)"

    def gb(row):
        return f"{row['peak_gpu_gb']:.1f}" if row.get("peak_gpu_gb") is not None else "-"

    for row in results.get("retrieval", []) if isinstance(results.get("retrieval"), list) else []:
        ok = row["p50_ms"] <= TARGETS["retrieval_ms"]
        table.add_row("retrieval", f"{row['n_candidates']} candidates {row['dtype']}", f"{row['p50_ms']:.2f} ms",
                      f"{row['p99_ms']:.2f} ms", gb(row), "<= 30 ms", met(ok))
    prior = results.get("prior", {})
    if "p50_ms" in prior:
        table.add_row("prior", f"{prior['steps']} DDIM steps {prior['dtype']}", f"{prior['p50_ms']:.0f} ms",
                      f"{prior['p99_ms']:.0f} ms", gb(prior), "", "")
    for row in results.get("unclip", []) if isinstance(results.get("unclip"), list) else []:
        if "unclip" not in row:
            table.add_row("unCLIP", f"{row.get('preset', '')} {row['acceleration']}",
                          row.get("skipped") or row.get("error", "")[:60], "", "", "", "")
            continue
        setting = f"{row['preset']} ({row['scheduler']} {row['steps']}) {row['acceleration']}"
        total = row.get("reconstruction_total_ms")
        target, met_text = "", ""
        if row["preset"] == "fast" and total is not None:
            target, met_text = "<= 1.0 s with the prior", met(total <= 1000 * TARGETS["fast_reconstruction_s"])
        table.add_row("unCLIP", setting, f"{row['unclip']['p50_ms']:.0f} ms"
                      + (f" (+prior {total:.0f} ms)" if total is not None else ""),
                      f"{row['unclip']['p99_ms']:.0f} ms", gb(row), target, met_text)
    fine = results.get("finetune", {})
    if "step_ms" in fine:
        ok = fine["projected_150_epochs_min"] <= TARGETS["finetune_150_epochs_min"]
        table.add_row("fine-tune", f"{fine['model']}, {fine['trials']} trials, batch {fine['batch']}",
                      f"{fine['step_ms']:.0f} ms/step", f"150 epochs: {fine['projected_150_epochs_min']:.1f} min",
                      gb(fine), "<= 10 min", met(ok))
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
