"""Benchmark of the decoding stage: retrieval latency, reconstruction latency per solver, and the solver's quality cost.

Run from the repository root::

    python bench/decode.py             # retrieval 1000/10000 x 256x1664, CPU tiny + medium UNets
    python bench/decode.py --quick     # small smoke run (seconds)
    python bench/decode.py --real      # + the real-size SDXL-unCLIP UNet at 768 px on the GPU (random weights)
    python bench/decode.py --real --compile torch   # the same with torch.compile

Sections

- retrieval: p50/p99 of one single-trial query (256x1664 tokens) against N candidates with
  :class:`rt_mindeye.decode.retrieval.Retriever` (candidates normalised once, one matrix product) vs the naive
  baseline measured in the same run (MindEye2's evaluation style: re-normalise every candidate for each query, in
  chunks of 1000, then the product);
- reconstruction (CPU, tiny and medium UNets in the unCLIP layout, random weights): time per image for each
  solver/steps setting, and the quality cost against the 38-step Euler result (MindEye2's sampler) from the same
  noise: relative L2 error of the final latent, and PixCorr / SSIM of the images. With random weights this measures
  the solver's discretisation error on a random network (random VAEs also saturate most pixels, so the latent error
  is the informative column), a proxy only: rerun with the converted checkpoint for the real cost;
- presets: each preset (and neighbours) against the converged solution of the same sampling problem (Euler, 250
  steps, same noise), median relative latent error over seeds, tiny and medium UNets;
- real (``--real``, GPU): the real-size UNet (2.6 B parameters, cross-attention on 256x1664 tokens) + SDXL VAE at
  768 px, fp16 UNet / bf16 VAE, per setting, against the 1.0 s target on an H100.

Prints a rich table and writes ``bench/results/decode.json``. Timings on a busy machine are not meaningful:
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rt_mindeye.decode.config import ReconstructConfig  # noqa: E402
from rt_mindeye.decode.reconstruct import UnclipReconstructor  # noqa: E402
from rt_mindeye.decode.retrieval import Retriever  # noqa: E402
from rt_mindeye.decode.unclip import (SD_VAE_CONFIG, UNCLIP_UNET_CONFIG, build_unet, build_vae,  # noqa: E402
                                      tiny_unet_config, tiny_vae_config)
from rt_mindeye.eval.metrics import pixcorr, ssim  # noqa: E402

RESULTS = REPO / "bench" / "results" / "decode.json"
REFERENCE = ("euler", 38)
SETTINGS = [("euler", 38), ("euler", 16), ("dpm++2m-karras", 20), ("dpm++2m-karras", 16), ("dpm++2m-karras", 12),
            ("dpm++2m-karras", 8), ("dpm++2m", 12), ("unipc", 12), ("unipc", 8)]
QUICK_SETTINGS = [("euler", 38), ("dpm++2m-karras", 16), ("dpm++2m-karras", 8), ("unipc", 8)]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    array = np.asarray(samples_ms)
    return {"p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99)),
            "n": int(array.size)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- retrieval --------------------------------------------------------------------------------------------------------


def naive_topk(query: torch.Tensor, candidates: torch.Tensor, k: int, chunk: int = 1000):
    """Baseline: normalise query and every candidate on each call (as an offline evaluation loop does)."""
    q = query.reshape(1, -1).float()
    q = q / q.norm()
    scores = []
    for start in range(0, candidates.shape[0], chunk):
        block = candidates[start:start + chunk].reshape(min(chunk, candidates.shape[0] - start), -1).float()
        block = block / block.norm(dim=1, keepdim=True)
        scores.append(block @ q[0])
    return torch.topk(torch.cat(scores), k)


def bench_retrieval(n_candidates: list[int], token_shape: tuple[int, int], repeats: int, device: torch.device,
                    max_gb: float = 6.0):
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in n_candidates:
        # candidates + the retriever's normalised copy, float32: 10,000 x 256 x 1664 is 2 x 17 GB
        needed_gb = 2 * n * int(np.prod(token_shape)) * 4 / 1e9
        if device.type == "cpu" and needed_gb > max_gb:
            rows.append({"n_candidates": n, "tokens": list(token_shape), "device": str(device),
                         "skipped": f"needs {needed_gb:.0f} GB of host memory (> --max-gb {max_gb:g})"})
            continue
        candidates = torch.randn((n, *token_shape), generator=generator).to(device)
        retriever = Retriever(candidates, device=str(device))
        query = candidates[n // 2] + 0.5 * torch.randn(token_shape, generator=generator).to(device)
        for _ in range(3):  # warm-up
            retriever.topk(query, k=5)
            naive_topk(query, candidates, 5)
        ours, base = [], []
        for _ in range(repeats):
            _sync(device)
            tick = time.perf_counter()
            indices, _ = retriever.topk(query, k=5)
            ours.append((time.perf_counter() - tick) * 1e3)
            tick = time.perf_counter()
            naive = naive_topk(query, candidates, 5)
            _sync(device)
            base.append((time.perf_counter() - tick) * 1e3)
        assert int(indices[0, 0]) == int(naive.indices[0]) == n // 2
        row = {"n_candidates": n, "tokens": list(token_shape), "device": str(device),
               "retriever": percentiles(ours), "naive": percentiles(base)}
        row["speedup_p50"] = row["naive"]["p50_ms"] / row["retriever"]["p50_ms"]
        rows.append(row)
        del candidates, retriever
    return rows


# --- reconstruction ---------------------------------------------------------------------------------------------------


def medium_components():
    unet_config = tiny_unet_config(block_out_channels=(64, 128, 128), layers_per_block=1,
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                   transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2),
                                   cross_attention_dim=1664, norm_num_groups=32, addition_time_embed_dim=256,
                                   projection_class_embeddings_input_dim=1024, sample_size=16)
    vae_config = tiny_vae_config(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16, sample_size=128)
    return unet_config, vae_config, 128, (256, 1664)


def tiny_components():
    return tiny_unet_config(), tiny_vae_config(), 16, (16, 24)


def bench_reconstruction(label: str, unet_config, vae_config, image_size: int, token_shape, settings, repeats: int,
                         device: str, compile_mode: str = "none", dtypes=("auto", "auto")):
    unet = build_unet(unet_config, seed=0)
    vae = build_vae(vae_config, seed=1)
    config = ReconstructConfig(image_size=image_size, device=device, compile=compile_mode, unet_dtype=dtypes[0],
                               vae_dtype=dtypes[1])
    base = UnclipReconstructor(unet, vae, config=config)
    tokens = torch.randn((1, *token_shape), generator=torch.Generator().manual_seed(2))
    reference_out = base.with_config(scheduler=REFERENCE[0]).reconstruct(tokens, steps=REFERENCE[1], seed=7)
    reference, reference_latents = reference_out.images, reference_out.latents
    rows = []
    for scheduler, steps in settings:
        recon = base.with_config(scheduler=scheduler)
        recon.reconstruct(tokens, steps=steps, seed=7)  # warm-up (and compilation)
        times, denoise, vae_ms = [], [], []
        for _ in range(repeats):
            out = recon.reconstruct(tokens, steps=steps, seed=7)
            times.append(out.timings_ms["total_ms"])
            denoise.append(out.timings_ms["denoise_ms"])
            vae_ms.append(out.timings_ms["vae_ms"])
        rows.append({
            "model": label, "device": str(base.device), "image_px": image_size, "scheduler": scheduler,
            "steps": steps, "compile": compile_mode, "unet_dtype": str(base.unet_dtype),
            "total": percentiles(times), "denoise_p50_ms": float(np.median(denoise)),
            "vae_p50_ms": float(np.median(vae_ms)),
            "latent_rel_err_vs_euler38": float((out.latents - reference_latents).norm() / reference_latents.norm()),
            "pixcorr_vs_euler38": pixcorr(out.images, reference),
            "ssim_vs_euler38": ssim(out.images, reference),
        })
    return rows


# --- presets against a converged solution -----------------------------------------------------------------------------

CONVERGED = ("euler", 250)


def bench_presets(label: str, unet_config, vae_config, image_size: int, token_shape, seeds: int) -> list[dict]:
    """Each preset's distance to the converged solution of the same sampling problem (same tokens, unconditional
    tokens and initial noise; Euler with 250 steps), over several seeds: how much of the image is the solver's
    discretisation error. Random weights: a proxy for the solver error, not for image quality."""
    from rt_mindeye.decode.config import PRESETS

    unet = build_unet(unet_config, seed=0)
    vae = build_vae(vae_config, seed=1)
    base = UnclipReconstructor(unet, vae, config=ReconstructConfig(image_size=image_size, device="cpu"))
    settings = {name: (p["scheduler"], p["steps"]) for name, p in PRESETS.items()}
    settings.update({"dpm++2m-karras 12": ("dpm++2m-karras", 12), "dpm++2m-karras 20": ("dpm++2m-karras", 20),
                     "euler 16": ("euler", 16)})
    errors: dict[str, list[float]] = {name: [] for name in settings}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for seed in range(seeds):
        tokens = torch.randn((1, *token_shape), generator=torch.Generator().manual_seed(100 + seed))
        reference = base.with_config(scheduler=CONVERGED[0], steps=CONVERGED[1]).reconstruct(tokens, seed=seed)
        for name, (scheduler, steps) in settings.items():
            out = base.with_config(scheduler=scheduler, steps=steps).reconstruct(tokens, seed=seed)
            errors[name].append(float((out.latents - reference.latents).norm() / reference.latents.norm()))
            times[name].append(out.timings_ms["denoise_ms"])
    return [{"model": label, "setting": name, "scheduler": settings[name][0], "steps": settings[name][1],
             "seeds": seeds, "latent_rel_err_vs_converged_median": float(np.median(errors[name])),
             "latent_rel_err_vs_converged": errors[name], "denoise_p50_ms_cpu": float(np.median(times[name]))}
            for name in settings]


# --- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--candidates", type=int, nargs="+", default=None,
                        help="candidate counts for retrieval (default 1000 10000; quick 200 1000)")
    parser.add_argument("--device", default="auto", help="retrieval/reconstruction device for GPU sections")
    parser.add_argument("--real", action="store_true", help="time the real-size SDXL-unCLIP UNet on the GPU")
    parser.add_argument("--compile", default="none", choices=("none", "torch", "tensorrt"),
                        help="UNet acceleration for --real")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 with --quick, for a shared machine)")
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="host memory the CPU retrieval section may use (larger candidate sets are skipped)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(width=140)
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if (args.device == "auto" and cuda) else
                          ("cpu" if args.device == "auto" else args.device))

    results: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads(),
                                 "gpu": torch.cuda.get_device_name(0) if cuda else None},
                     "quick": args.quick}

    # 1. Retrieval
    if args.quick:
        counts, tokens, repeats = args.candidates or [200, 1000], (16, 1664), args.repeats or 10
    else:
        counts, tokens, repeats = args.candidates or [1000, 10000], (256, 1664), args.repeats or 50
    results["retrieval"] = bench_retrieval(counts, tokens, repeats, torch.device("cpu"), args.max_gb)
    if device.type == "cuda":
        results["retrieval"] += bench_retrieval(counts, tokens, repeats, device)
    table = Table(title="retrieval: one single-trial query, top-5 cosine")
    for column in ("device", "candidates", "tokens", "p50 ms", "p99 ms", "naive p50 ms", "naive p99 ms", "speed-up"):
        table.add_column(column, justify="right")
    for row in results["retrieval"]:
        if "skipped" in row:
            table.add_row(row["device"], str(row["n_candidates"]), "x".join(map(str, row["tokens"])),
                          row["skipped"], "", "", "", "")
            continue
        table.add_row(row["device"], str(row["n_candidates"]), "x".join(map(str, row["tokens"])),
                      f"{row['retriever']['p50_ms']:.2f}", f"{row['retriever']['p99_ms']:.2f}",
                      f"{row['naive']['p50_ms']:.2f}", f"{row['naive']['p99_ms']:.2f}", f"{row['speedup_p50']:.1f}x")
    console.print(table)

    # 2. Reconstruction on the CPU, tiny and medium models
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    rec_repeats = args.repeats or (2 if args.quick else 5)
    rows = bench_reconstruction("tiny", *tiny_components(), settings, rec_repeats, "cpu")
    if not args.quick:
        rows += bench_reconstruction("medium", *medium_components(), settings, max(2, rec_repeats // 2), "cpu")
    # 3. Real size on the GPU
    if args.real:
        if not cuda:
            console.print("[yellow]--real needs a CUDA GPU; skipped[/yellow]")
        else:
            real_settings = [(s, n) for s, n in SETTINGS if (s, n) != ("euler", 16)]
            rows += bench_reconstruction("sdxl-unclip", UNCLIP_UNET_CONFIG, SD_VAE_CONFIG, 768, (256, 1664),
                                         real_settings, rec_repeats, "cuda", compile_mode=args.compile)
    results["reconstruction"] = rows

    # 4. Presets against the converged solution
    preset_rows = bench_presets("tiny", *tiny_components(), seeds=2 if args.quick else 5)
    if not args.quick:
        preset_rows += bench_presets("medium", *medium_components(), seeds=3)
    results["presets"] = preset_rows
    table = Table(title=f"presets: latent distance to the converged solution ({CONVERGED[0]} {CONVERGED[1]} "
                        "steps, same noise), median over seeds; random weights")
    for column in ("model", "setting", "solver", "steps", "rel. error", "CPU denoise ms"):
        table.add_column(column, justify="right")
    for row in preset_rows:
        table.add_row(row["model"], row["setting"], row["scheduler"], str(row["steps"]),
                      f"{row['latent_rel_err_vs_converged_median']:.4f}", f"{row['denoise_p50_ms_cpu']:.0f}")
    console.print(table)
    table = Table(title="reconstruction: one image, CFG 5 (quality = similarity to 38-step Euler, same noise)")
    for column in ("model", "device", "px", "solver", "steps", "p50 ms", "p99 ms", "denoise ms", "vae ms",
                   "latent err", "PixCorr", "SSIM"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["model"], row["device"], str(row["image_px"]), row["scheduler"], str(row["steps"]),
                      f"{row['total']['p50_ms']:.0f}", f"{row['total']['p99_ms']:.0f}",
                      f"{row['denoise_p50_ms']:.0f}", f"{row['vae_p50_ms']:.0f}",
                      f"{row['latent_rel_err_vs_euler38']:.3f}", f"{row['pixcorr_vs_euler38']:.3f}", f"{row['ssim_vs_euler38']:.3f}")
    console.print(table)
    real = [r for r in rows if r["model"] == "sdxl-unclip"]
    if real:
        fits = [f"{r['scheduler']} {r['steps']}" for r in real if r["total"]["p50_ms"] <= 1000.0]
        console.print(f"768 px settings within the 1.0 s target: {', '.join(fits) or 'none'}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
