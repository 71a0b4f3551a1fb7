"""Loading large checkpoints within a memory budget: tensors go one by one to their final device and dtype.

Both converters build their models on the meta device (no memory) and assign the checkpoint's tensors into them
(``load_state_dict(assign=True)``). :func:`materialize` prepares those tensors: each is cast and moved on its own,
so at most one converted tensor is in flight besides what is already placed. A checkpoint read with
``torch.load(mmap=True)`` is a private, read-only file mapping: a tensor already in the wanted dtype and device is
assigned without a copy (its pages load when first used), and after a tensor is converted its source pages are
returned to the kernel (``madvise(MADV_DONTNEED)``: clean file pages of a private mapping are re-read from the file
if touched again, never lost), so a float32 file loaded as float16 does not keep the float32 pages resident.

:func:`peak_rss_bytes` and :func:`current_rss_bytes` report the process's memory for ``rt-mindeye model check
--load`` and the loading bench.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
import sys
from typing import Mapping

import torch

_MADV_DONTNEED = 4  # Linux


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the resident pages under ``tensor`` (whole pages inside its bytes only). Only call this for tensors that
    live in a private read-only file mapping (``torch.load(mmap=True)``): on anonymous memory the kernel would zero
    the pages. Returns whether anything was released."""
    if _LIBC is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = (start + page - 1) // page * page, end // page * page
    if last <= first:
        return False
    return _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0


def materialize(state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", file_backed: bool = False,
                keep_dtype: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` on ``device`` in ``dtype`` (floating tensors only; None keeps each tensor's),
    converted one at a time. ``file_backed``: the inputs come from a memory-mapped checkpoint, so converted sources
    are released page by page. Keys ending with one of ``keep_dtype`` keep their dtype (e.g. schedule buffers)."""
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = dtype if (dtype is not None and value.is_floating_point() and not key.endswith(keep_dtype)) \
            else value.dtype
        if value.dtype == target and value.device == device:
            out[key] = value
            continue
        if file_backed and value.device.type == "cpu" and value.is_contiguous():
            out[key] = _convert_releasing(value, target, device)
        else:
            out[key] = value.to(device=device, dtype=target)
    return out


CHUNK_BYTES = 64 << 20  # source bytes converted at a time from a memory-mapped file


def _convert_releasing(value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Convert a file-backed tensor chunk by chunk, releasing each chunk's source pages as soon as it is copied:
    the full model's 1.75 B-number ``backbone_linear`` would otherwise hold 7 GB of float32 pages beside its
    3.5 GB float16 copy."""
    out = torch.empty(value.shape, dtype=dtype, device=device)
    source, target = value.reshape(-1), out.reshape(-1)
    step = max(1, CHUNK_BYTES // value.element_size())
    for start in range(0, source.numel(), step):
        chunk = source[start:start + step]
        target[start:start + step].copy_(chunk)
        release_file_pages(chunk)
    return out


def touch(module: torch.nn.Module) -> None:
    """Read one element per memory page of every CPU tensor of ``module`` (a strided view: no copy), so that lazily
    mapped weights are resident, as they are once the model has run or been moved to a GPU."""
    step_bytes = mmap.PAGESIZE
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                step = max(1, step_bytes // tensor.element_size())
                tensor.detach().reshape(-1)[::step].sum()


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``; kilobytes on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def state_dict_bytes(module: torch.nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of the module's unique parameters and buffers if stored in ``dtype`` (floating) or as they are."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        size = torch.empty((), dtype=dtype).element_size() if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


# -- loading a checkpoint as the decoder does, with its memory -------------------------------------------------------

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def load_as_decoder(path, *, kind: str | None = None, device: str = "cpu", dtype: str = "auto") -> dict:
    """Load ``path`` the way the decoder service does and measure the process's memory for it.

    ``kind``: ``mindeye2`` (:func:`~rt_mindeye.convert.mindeye2.load_for_inference`) or ``unclip``
    (:func:`~rt_mindeye.convert.unclip.load_unclip_components` with MindEye2's settings); None tells them apart by their
    keys. ``dtype``: ``auto`` is the decoder's choice for ``device`` (float16 UNet / bfloat16 VAE / float16 MindEye2 on
    a GPU, float32 on a CPU). Returns a report: kind, device, dtype, parameters, ``fp16_bytes`` (the loaded modules'
    size in float16), ``loaded_bytes`` (in the dtype they were loaded in), ``baseline_rss_bytes`` (before reading the
    file), ``peak_rss_bytes`` (the process's peak) and ``peak_over_baseline_bytes``, seconds. For a meaningful peak,
    call it in a process that has loaded nothing big before (the CLI and the bench do).
    """
    import time
    from pathlib import Path

    path = Path(path)
    if kind is None:
        kind = detect_kind(path)
    # Import what the load needs first, so that the baseline holds the libraries and the difference is the model.
    if kind == "unclip":
        import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401
        import diffusers.models.unets.unet_2d_condition  # noqa: F401
    else:
        import rt_mindeye.model.mindeye  # noqa: F401
        from diffusers.models.autoencoders.vae import Decoder  # noqa: F401  (the low-level head's)
    baseline = current_rss_bytes()
    started = time.perf_counter()
    if kind == "mindeye2":
        from rt_mindeye.convert.mindeye2 import inference_dtype, load_for_inference

        chosen = inference_dtype(device) if dtype == "auto" else DTYPES[dtype]
        modules = [load_for_inference(path, device=device, dtype=chosen).model]
        dtypes = {"model": str(chosen).replace("torch.", "")}
    elif kind == "unclip":
        from rt_mindeye.convert.unclip import load_unclip_components

        gpu = torch.device(device).type == "cuda"
        unet_dtype = (torch.float16 if gpu else torch.float32) if dtype == "auto" else DTYPES[dtype]
        vae_dtype = (torch.bfloat16 if gpu else torch.float32) if dtype == "auto" else DTYPES[dtype]
        unet, vae, _ = load_unclip_components(path, dtype=unet_dtype, vae_dtype=vae_dtype, device=device)
        modules = [unet, vae]
        dtypes = {"unet": str(unet_dtype).replace("torch.", ""), "vae": str(vae_dtype).replace("torch.", "")}
    else:
        raise ValueError(f"kind must be 'mindeye2' or 'unclip', got {kind!r}")
    for module in modules:  # memory-mapped weights become resident when first read: read them all now
        touch(module)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    report = {
        "path": str(path), "kind": kind, "device": str(device), "dtypes": dtypes,
        "parameters": sum(sum(p.numel() for p in m.parameters()) for m in modules),
        "fp16_bytes": sum(state_dict_bytes(m, torch.float16) for m in modules),
        "loaded_bytes": sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in modules),
        "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_over_baseline_bytes": max(0, peak - baseline),
        "seconds": seconds,
    }
    report["peak_over_fp16"] = report["peak_over_baseline_bytes"] / max(report["fp16_bytes"], 1)
    return report


def detect_kind(path) -> str:
    """``mindeye2`` or ``unclip`` from the checkpoint's keys (read memory-mapped: cheap)."""
    from rt_mindeye.convert import mindeye2, unclip
    from rt_mindeye.errors import CheckpointError

    contents = mindeye2.read_checkpoint(path)
    if unclip.is_unclip_checkpoint(contents.state_dict):
        return "unclip"
    if mindeye2.is_mindeye2(mindeye2.convert(contents.state_dict)):
        return "mindeye2"
    raise CheckpointError(path, "neither a MindEye2 nor a generative-models unCLIP checkpoint (probe keys absent)")
