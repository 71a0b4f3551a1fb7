from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.decode.retrieval import RetrievalError, Retriever


def _naive_cosine(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """One candidate at a time, float64: the obviously-correct reference."""
    q = query.reshape(-1).astype(np.float64)
    out = []
    for candidate in candidates:
        c = candidate.reshape(-1).astype(np.float64)
        out.append(q @ c / (np.linalg.norm(q) * np.linalg.norm(c)))
    return np.array(out)


def test_topk_matches_naive_cosine_on_tokens():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(40, 6, 5)).astype(np.float32)
    queries = rng.normal(size=(3, 6, 5)).astype(np.float32)
    retriever = Retriever(candidates, ids=[f"img{i}" for i in range(40)])
    indices, scores = retriever.topk(queries, k=4)
    assert indices.shape == (3, 4) and scores.shape == (3, 4) and scores.dtype == np.float32
    for row, query in enumerate(queries):
        reference = _naive_cosine(query, candidates)
        expected = np.argsort(-reference)[:4]
        np.testing.assert_array_equal(indices[row], expected)
        np.testing.assert_allclose(scores[row], reference[expected], rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(scores[row]) <= 0)


def test_query_equal_to_a_scaled_candidate_finds_it_with_score_one():
    rng = np.random.default_rng(1)
    candidates = torch.from_numpy(rng.normal(size=(25, 4, 3)).astype(np.float32))
    retriever = Retriever(candidates, ids=[f"c{i}" for i in range(25)])
    queries = torch.stack([candidates[7] * 3.0, candidates[19] * 0.01])
    ids, scores = retriever.topk_ids(queries, k=1)
    assert ids == [["c7"], ["c19"]]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_single_trial_without_batch_axis_and_flat_vectors():
    rng = np.random.default_rng(2)
    flat = rng.normal(size=(10, 12)).astype(np.float32)
    retriever = Retriever(flat)
    indices, _ = retriever.topk(flat[3], k=2)
    assert indices.shape == (1, 2) and indices[0, 0] == 3
    assert retriever.ids[3] == "3"


def test_k_larger_than_candidates_is_clipped():
    retriever = Retriever(np.eye(3, dtype=np.float32))
    indices, scores = retriever.topk(np.eye(3, dtype=np.float32)[:1], k=10)
    assert indices.shape == (1, 3)
    assert indices[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0)


def test_float16_storage_gives_the_same_ranking_for_clear_winners():
    rng = np.random.default_rng(3)
    candidates = rng.normal(size=(30, 64)).astype(np.float32)
    queries = candidates[[4, 11]] + 0.1 * rng.normal(size=(2, 64)).astype(np.float32)
    half = Retriever(candidates, dtype=torch.float16)
    indices, scores = half.topk(queries, k=3)
    full_indices, full_scores = Retriever(candidates).topk(queries, k=3)
    assert indices[:, 0].tolist() == [4, 11] == full_indices[:, 0].tolist()
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores[:, 0], full_scores[:, 0], atol=2e-3)


@pytest.mark.parametrize("bad, field", [
    (np.zeros((2, 6, 4), np.float32), "brain_embeddings"),
    (np.full((1, 6, 5), np.nan, np.float32), "brain_embeddings"),
])
def test_bad_queries_name_the_field(bad, field):
    retriever = Retriever(np.ones((4, 6, 5), np.float32))
    with pytest.raises(RetrievalError) as info:
        retriever.topk(bad)
    assert info.value.field == field


def test_bad_candidates_and_ids():
    with pytest.raises(RetrievalError, match="ids"):
        Retriever(np.ones((4, 3), np.float32), ids=["a", "b"])
    with pytest.raises(RetrievalError, match="candidate_embeddings"):
        Retriever(np.ones((4,), np.float32))
    with pytest.raises(RetrievalError, match="k"):
        Retriever(np.ones((4, 3), np.float32)).topk(np.ones((1, 3), np.float32), k=0)


def test_chunked_normalisation_equals_one_shot(monkeypatch):
    rng = np.random.default_rng(4)
    candidates = rng.normal(size=(23, 3, 4)).astype(np.float32) * rng.uniform(0.1, 10, size=(23, 1, 1))
    whole = Retriever(candidates).candidates_
    monkeypatch.setattr(Retriever, "NORMALISE_CHUNK", 5)
    chunked = Retriever(candidates).candidates_
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked.norm(dim=1), torch.ones(23))
