"""Worker threads and process memory settings of the offline fit.

Nothing here imports numba or the fit's kernels: ``rt-mindeye glm fit`` reads and decompresses its runs on these
threads while another thread loads the fit's modules (:mod:`rt_mindeye.cli.glm`). :mod:`rt_mindeye.glm.fit`
re-exports every name.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

try:  # numpy's switch for madvise(MADV_HUGEPAGE) on its large allocations (private, but stable since numpy 1.16)
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:  # pragma: no cover - numpy < 2 keeps it in numpy.core
    try:
        from numpy.core.multiarray import _set_madvise_hugepage
    except ImportError:
        _set_madvise_hugepage = None


@contextmanager
def without_hugepages():
    """numpy's large arrays without the transparent-huge-page hint while the fit runs.

    With the kernel's THP ``defrag`` set to ``madvise`` (Ubuntu's default), every fresh hinted allocation may compact
    memory synchronously when the page cache has fragmented it: the fit spent 4 to 8 s of system time on it at 20,000
    voxels x 11 runs (1.5 s with plain pages; the arrays are written once or twice each, so huge pages save little
    TLB time in exchange). Process-wide while active; the previous setting is restored after."""
    if _set_madvise_hugepage is None:
        yield
        return
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


def retain_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20,
                        top_pad: int = 64 << 20) -> bool:
    """glibc's allocator set to reuse freed memory for the fit's many large temporaries (for a process that runs
    one fit, e.g. ``rt-mindeye glm fit``: process-wide and not undone). By default glibc maps arrays above 32 MB
    afresh and returns freed heap memory above 64 MB to the kernel, so each new temporary is faulted in page by
    page again: 1.3-1.6 s of system time at 20,000 voxels x 11 runs, 0.6-0.7 s with arrays below
    ``mmap_threshold`` on the heap, up to ``trim_threshold`` of freed memory kept (peak RSS +0.16 GB there) and the
    heap grown ``top_pad`` at a time. Larger arrays (whole-brain runs) are still mapped and returned. Returns
    whether it applied (False without glibc's ``mallopt``)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    return all(mallopt(option, value) == 1 for option, value in
               ((m_mmap_threshold, mmap_threshold), (m_trim_threshold, trim_threshold), (m_top_pad, top_pad)))


def n_workers() -> int:
    """Threads for the fit's run- and fraction-level parallelism (BLAS itself stays single-threaded: see
    estimator.py)."""
    return max(1, os.cpu_count() or 1)


def parallel_map(function, items) -> list:
    """``[function(item) for item in items]`` on :func:`n_workers` threads (numpy's BLAS calls and the serial numba
    kernels release the GIL), results in order; plain loop with one worker."""
    items = list(items)
    workers = min(n_workers(), len(items))
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))
