"""``rt-mindeye glm``: the offline calibration fit of single-trial betas.

    rt-mindeye glm fit --bold RUN1.nii.gz RUN2.nii.gz --events RUN1_events.tsv RUN2_events.tsv --tr 1.5 \\
        [--mask MASK.nii.gz] [--noise-mask BRAIN.nii.gz] [--model d] [--n-pcs K] [--no-rescale] \\
        [--prewhiten auto|off|RHO] [--save-types abcd] [--motion RUN1_motion.tsv ...] [--config session.yaml] --out DIR
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

from rt_mindeye.process import cli_path


def register(subparsers) -> None:
    glm = subparsers.add_parser("glm", help="single-trial GLM (GLMsingle-style calibration fit)")
    sub = glm.add_subparsers(dest="glm_command", metavar="GLM_COMMAND")
    fit = sub.add_parser("fit", help="fit single-trial betas on calibration runs and freeze the choices",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fit.add_argument("--bold", nargs="+", type=cli_path, required=True, metavar="RUN.nii.gz", help="4-D BOLD runs")
    fit.add_argument("--events", nargs="+", type=cli_path, required=True, metavar="EVENTS.tsv",
                     help="BIDS events per run (onset, duration, trial_type); repeats share a condition")
    fit.add_argument("--tr", type=float, required=True, help="repetition time in seconds")
    fit.add_argument("--mask", type=cli_path, default=None, help="3-D mask of the voxels to fit and write (default: intensity "
                                                  "threshold)")
    fit.add_argument("--noise-mask", type=cli_path, default=None,
                     help="3-D mask of the voxels the noise pool is drawn from (default: a brain mask from the mean "
                          "volume, i.e. the whole brain even when --mask selects a region)")
    fit.add_argument("--n-pcs", type=int, default=None, metavar="K",
                     help="use K noise components instead of choosing the count by cross-validation")
    fit.add_argument("--no-rescale", action="store_true",
                     help="skip GLMsingle's scale-and-offset rescaling of the ridge betas")
    fit.add_argument("--prewhiten", default=None, metavar="auto|off|RHO",
                     help="AR(1) prewhitening of data and designs: auto (default: the noise pool's lag-1 "
                          "autocorrelation), off (as GLMsingle) or a coefficient in [0, 0.95]")
    fit.add_argument("--save-types", default="", metavar="abcd",
                     help="also write betas_type<x>.nii.gz for each of these model types (up to --model)")
    fit.add_argument("--model", choices=("a", "b", "c", "d"), default=None, help="GLMsingle model type (default: "
                     "the config's, d)")
    fit.add_argument("--condition-column", default="trial_type",
                     help="events column naming the condition (repeated images share it)")
    fit.add_argument("--motion", nargs="+", type=cli_path, default=None, metavar="MOTION.tsv",
                     help="motion parameters per run (one row per volume) used as nuisance regressors")
    fit.add_argument("--config", type=cli_path, default=None, help="YAML file whose 'glm' section configures the fit")
    fit.add_argument("--out", type=cli_path, required=True, help="output directory")
    fit.add_argument("--quiet", action="store_true", help="no progress display")
    fit.set_defaults(func=run_fit)
    glm.set_defaults(func=lambda args: (glm.print_help(), 1)[1])


class _RichProgress:
    """Draws one rich progress bar per fit stage."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks = {}

    def __call__(self, stage: str, completed: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1))
        self.progress.update(self.tasks[stage], completed=completed, total=max(total, 1))


#: Imports that ``glm fit`` never uses and that two of its dependencies make at start-up, each unless it fails:
#: nibabel imports pydicom for the DICOM extension of NIfTI headers (0.13 s), and numba's first kernel load imports
#: scipy.linalg to check for BLAS (0.17 s: scipy's array-API layer imports numpy.f2py), used only by numba's
#: np.dot-style functions, which the fit's kernels do not call. Both libraries treat the module as optional: nibabel
#: keeps DICOM header extensions as raw bytes, and numba's np.dot-style functions compiled later in this process fall
#: back to loops.
UNUSED_IMPORTS = {"nibabel": "pydicom", "numba": "scipy.linalg"}

#: Deadline for loading the fit's modules (seconds; about 0.4 s with numba's cached kernels, a few more when numba
#: compiles them afresh).
FIT_MODULES_TIMEOUT_S = 600.0


@contextmanager
def skipped_imports(names):
    """While active, importing any of ``names`` not yet imported raises ImportError (``sys.modules[name] = None``);
    their entries are removed again afterwards, so later imports work as usual."""
    skipped = [name for name in names if name not in sys.modules]
    for name in skipped:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in skipped:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def load_fit_modules() -> None:
    """Import the fit's modules and load numba (its array support without :data:`UNUSED_IMPORTS`, then one cached
    kernel): run on a thread while the main thread reads the runs, whose decompression releases the GIL (0.4 s of
    the command's start-up at 20,000 voxels x 11 runs that no longer come before the reading)."""
    with skipped_imports([UNUSED_IMPORTS["numba"]]):
        try:
            import numba.np.arraymath  # noqa: F401  (what numba's first kernel load imports)
        except ImportError:  # pragma: no cover - a numba without it loads its kernels the usual way
            pass
    import numpy as np

    from rt_mindeye.glm import estimator, kernels  # noqa: F401

    kernels.percent_signal(np.zeros((1, 1), np.float32), np.empty(1), np.empty((1, 1), np.float32))


def run_fit(args) -> int:
    collecting = gc.isenabled()
    # The command's arrays are freed by reference counting; the cyclic collector would run ~260 times, mostly over
    # the objects of the imports and numba's typing (~0.1 s loaded at 20,000 voxels x 11 runs).
    gc.disable()
    try:
        return _run_fit_lean(args)
    finally:
        if collecting:
            gc.enable()


def _run_fit_lean(args) -> int:
    with skipped_imports([UNUSED_IMPORTS["nibabel"]]):
        import nibabel  # noqa: F401
    from rt_mindeye.glm.workers import retain_freed_memory, without_hugepages

    retain_freed_memory()  # this process runs one fit (see glm.workers.retain_freed_memory)
    # Reading and writing the runs too without huge pages (see glm.workers.without_hugepages).
    with without_hugepages(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-fit-modules") as executor:
        return _run_fit(args, executor.submit(load_fit_modules))


def _run_fit(args, fit_modules) -> int:
    import numpy as np

    from rt_mindeye.config import from_mapping, load, to_mapping
    from rt_mindeye.glm.config import GLMConfig
    from rt_mindeye.glm.design import RunEvents
    from rt_mindeye.glm.errors import GLMInputError, GLMWarning
    from rt_mindeye.glm.io import load_motion_tsv, load_session, write_outputs

    config = load(GLMConfig, args.config, "glm") if args.config else from_mapping(GLMConfig, {})
    overrides = {}
    if args.model:
        overrides["model"] = args.model
    if args.n_pcs is not None:
        overrides["n_pcs"] = args.n_pcs
    if args.no_rescale:
        overrides["rescale"] = False
    if args.prewhiten is not None:
        overrides["prewhiten"] = _prewhiten_option(args.prewhiten)
    if overrides:
        config = from_mapping(GLMConfig, {**to_mapping(config), **overrides}, source="command line")
    if len(args.events) != len(args.bold):
        raise GLMInputError("--events", f"{len(args.events)} events files for {len(args.bold)} runs")
    if args.motion is not None and len(args.motion) != len(args.bold):
        raise GLMInputError("--motion", f"{len(args.motion)} motion files for {len(args.bold)} runs")
    console, bars = _display(args.quiet)
    runs, mask, ref, noise_runs, noise_mask = load_session(args.bold, args.mask, args.noise_mask,
                                                           config.brain_fraction, config.brain_percentile)
    events = [RunEvents.from_tsv(p, condition_column=args.condition_column) for p in args.events]
    motion = [load_motion_tsv(p) for p in args.motion] if args.motion else None
    fit_modules.result(timeout=FIT_MODULES_TIMEOUT_S)  # loaded on a thread meanwhile (see load_fit_modules)
    from rt_mindeye.glm.estimator import GLMSingle
    console.print(f"[bold]glm fit[/]: model {config.model}, {len(runs)} runs, {runs[0].shape[1]} voxels, "
                  f"{sum(len(e) for e in events)} trials, TR {args.tr} s")
    start = time.perf_counter()
    with bars as progress:
        estimator = GLMSingle.from_config(config, save_types=args.save_types,
                                          progress=None if progress is None else _RichProgress(progress))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GLMWarning)  # printed below, once, after the progress bars
            estimator.fit(runs, events, args.tr, motion=motion, noise_runs=noise_runs)
    for message in estimator.warnings_:
        console.print(f"[yellow]warning[/]: {message}")
    out = write_outputs(estimator, mask, ref, args.out, to_mapping(config), noise_mask=noise_mask)
    console.print(f"fitted in {time.perf_counter() - start:.1f} s: {estimator.n_pcs_} noise PCs, median fraction "
                  f"{float(np.median(estimator.frac_)):.2f}, AR(1) prewhitening {estimator.ar_rho_:.2f}; wrote {out}")
    return 0


class _Silent:
    """The console of ``--quiet``: prints nothing (rich is not imported)."""

    def print(self, *args, **kwargs) -> None:
        pass


def _display(quiet: bool):
    """``(console, progress bars)``: rich's on stderr, or with ``quiet`` a silent console and no bars (rich's import
    is 25 ms of the command's start-up)."""
    if quiet:
        return _Silent(), nullcontext()
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return console, Progress(TextColumn("{task.description:<36}"), BarColumn(),
                             TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console)


def _prewhiten_option(text: str) -> float | None:
    """``--prewhiten``: auto -> None (estimated), off -> 0, else the coefficient."""
    from rt_mindeye.glm.errors import GLMInputError

    if text.strip().lower() == "auto":
        return None
    if text.strip().lower() == "off":
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise GLMInputError("--prewhiten", f"expected auto, off or a number in [0, 0.95], got {text!r}") from None
