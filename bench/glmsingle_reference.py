"""Runs the reference GLMsingle (cvnlab/GLMsingle, installed by hand in its own environment) on a session written by
``bench/glm.py`` and writes its betas and choices back. Not part of rt-mindeye: ``bench/glm.py --reference-glmsingle``
starts it with the reference environment's python, e.g. ``/work/scratch/glmsingle-venv/bin/python``.

    python bench/glmsingle_reference.py IN.npz OUT.npz

``IN.npz``: ``run0..`` (T, V) float32 intensities, ``onset_idx0..`` (K,) volume index of each trial's onset,
``cond0..`` (K,) condition number, ``stimdur``, ``tr``. GLMsingle runs with its defaults (library HRFs, GLMdenoise,
fractional ridge); BLAS threads are whatever the caller set (the bench sets one).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings

import numpy as np


def main(argv: list[str]) -> int:
    src, dst = argv[1], argv[2]
    from glmsingle.glmsingle import GLM_single

    with np.load(src) as f:
        n_runs = int(f["n_runs"])
        runs = [f[f"run{r}"] for r in range(n_runs)]
        onsets = [f[f"onset_idx{r}"] for r in range(n_runs)]
        conds = [f[f"cond{r}"] for r in range(n_runs)]
        stimdur, tr = float(f["stimdur"]), float(f["tr"])
    n_cond = int(max(c.max() for c in conds)) + 1
    design, data = [], []
    for run, on, c in zip(runs, onsets, conds):
        d = np.zeros((run.shape[0], n_cond), dtype=np.float32)
        d[on, c] = 1
        design.append(d)
        data.append(np.ascontiguousarray(run.T))  # voxels x time
    params = {"wantlibrary": 1, "wantglmdenoise": 1, "wantfracridge": 1, "wantfileoutputs": [0, 0, 0, 0],
              "wantmemoryoutputs": [1, 1, 1, 1], "seed": 0}
    glm = GLM_single(params)
    out = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        results = glm.fit(design, data, stimdur, tr, outputdir=tmp)
        out["fit_s"] = time.perf_counter() - start
    out["warnings"] = np.asarray([str(w.message) for w in caught])
    n_vox = runs[0].shape[1]
    for key, name in (("typeb", "b"), ("typec", "c"), ("typed", "d")):
        if key in results and "betasmd" in results[key]:
            out[f"betas_{name}"] = np.asarray(results[key]["betasmd"], dtype=np.float32).reshape(n_vox, -1).T
    typed = results.get("typed", {})
    for key in ("FRACvalue", "HRFindex", "pcnum", "noisepool", "pcvoxels", "xvaltrend", "scaleoffset"):
        if key in typed and typed[key] is not None:
            out[key] = np.asarray(typed[key]).reshape(n_vox, -1).squeeze() if np.size(typed[key]) >= n_vox \
                else np.asarray(typed[key])
    np.savez(dst, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
