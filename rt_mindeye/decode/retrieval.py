"""Top-k retrieval of candidate images from brain-predicted CLIP tokens.

MindEye2 scores a brain prediction against a candidate image by the cosine between the flattened, L2-normalised
256x1664 CLIP tokens of both. Candidates are known before the session, so they are flattened and normalised once, at
construction; a query is then one matrix product and a ``topk``: milliseconds even for ten thousand candidates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rt_mindeye.errors import RtMindEyeError


class RetrievalError(RtMindEyeError):
    """Candidate or query embeddings have the wrong shape or contents."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"retrieval {field}: {problem}")


def _as_tensor(array, field: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach()
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array))
    raise RetrievalError(field, f"expected a numpy array or torch tensor, got {type(array).__name__}")


def flatten_normalise(embeddings: torch.Tensor, *, batched: bool = True, eps: float = 1e-12) -> torch.Tensor:
    """(N, seq, dim) or (N, D) -> (N, seq*dim) float32 rows of unit L2 norm (zero rows stay zero)."""
    flat = embeddings.reshape(embeddings.shape[0], -1) if batched else embeddings.reshape(1, -1)
    flat = flat.to(torch.float32)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


class Retriever:
    """Cosine top-k retrieval over a fixed candidate set.

    Parameters
    ----------
    candidate_embeddings:
        (N, seq, dim) CLIP tokens or (N, D) vectors of the candidate images.
    ids:
        N identifiers (image names), returned by :meth:`topk_ids`.
    device:
        where the normalised candidates live and the product runs ("cpu", "cuda", ...).
    dtype:
        storage precision of the candidates; float32 (default) or float16 to halve memory on a GPU. Scores are
        always returned as float32.
    """

    NORMALISE_CHUNK = 256

    def __init__(self, candidate_embeddings, ids: Sequence[str] | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        candidates = _as_tensor(candidate_embeddings, "candidate_embeddings")
        if candidates.ndim not in (2, 3) or candidates.shape[0] == 0:
            raise RetrievalError("candidate_embeddings",
                                 f"expected (N, seq, dim) or (N, D) with N >= 1, got shape {tuple(candidates.shape)}")
        if not torch.isfinite(candidates).all():
            raise RetrievalError("candidate_embeddings", "contains NaN or infinite values")
        n = candidates.shape[0]
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]
        if len(self.ids) != n:
            raise RetrievalError("ids", f"{len(self.ids)} ids for {n} candidates")
        self.token_shape = tuple(candidates.shape[1:])
        self.device = torch.device(device)
        self.dtype = dtype
        # Normalise in float32, in chunks straight into the stored matrix: 10,000 x 256 x 1664 candidates are 17 GB
        # in float32, so a full-size temporary copy would double the peak memory.
        flat = candidates.reshape(n, -1)
        self.candidates_ = torch.empty(flat.shape, dtype=dtype, device=self.device)
        for start in range(0, n, self.NORMALISE_CHUNK):
            block = flat[start:start + self.NORMALISE_CHUNK].to(self.device)
            self.candidates_[start:start + self.NORMALISE_CHUNK] = flatten_normalise(block).to(dtype)

    @property
    def n_candidates(self) -> int:
        return self.candidates_.shape[0]

    @property
    def dim(self) -> int:
        return self.candidates_.shape[1]

    def _queries(self, brain_embeddings) -> torch.Tensor:
        queries = _as_tensor(brain_embeddings, "brain_embeddings")
        expected_ndim = 1 + len(self.token_shape)
        if queries.ndim == expected_ndim - 1 and tuple(queries.shape) == self.token_shape:
            queries = queries.unsqueeze(0)  # one trial without a batch axis
        if queries.ndim != expected_ndim or tuple(queries.shape[1:]) != self.token_shape:
            raise RetrievalError("brain_embeddings",
                                 f"expected (B, {', '.join(map(str, self.token_shape))}), got {tuple(queries.shape)}")
        if not torch.isfinite(queries).all():
            raise RetrievalError("brain_embeddings", "contains NaN or infinite values")
        return flatten_normalise(queries.to(self.device))

    def scores(self, brain_embeddings) -> torch.Tensor:
        """(B, N) float32 cosine similarities of each query to every candidate."""
        queries = self._queries(brain_embeddings).to(self.dtype)
        with torch.no_grad():
            return (queries @ self.candidates_.T).to(torch.float32)

    def topk(self, brain_embeddings, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Indices (B, k) int64 and cosine scores (B, k) float32 of the k best candidates, best first."""
        if k < 1:
            raise RetrievalError("k", f"must be >= 1, got {k}")
        k = min(k, self.n_candidates)
        values, indices = torch.topk(self.scores(brain_embeddings), k, dim=1, largest=True, sorted=True)
        return indices.cpu().numpy().astype(np.int64), values.cpu().numpy().astype(np.float32)

    def topk_ids(self, brain_embeddings, k: int = 5) -> tuple[list[list[str]], np.ndarray]:
        """Like :meth:`topk`, with candidate ids instead of indices."""
        indices, scores = self.topk(brain_embeddings, k)
        return [[self.ids[i] for i in row] for row in indices], scores
