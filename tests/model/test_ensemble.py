"""The ensemble's vote: each member's output direction counts equally, whatever its norm."""

import pytest
import torch

from rt_mindeye.model.ensemble import average_normalised


def test_one_member_is_returned_unchanged():
    out = torch.randn(3, 4, 5)
    assert average_normalised([out]) is out


def test_members_vote_with_their_direction_not_their_norm():
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 100.0], [0.0, 0.5]])
    mean = average_normalised([a, b])
    # Row 0: unit vectors (1, 0) and (0, 1) count equally although b's is 33x longer.
    assert torch.allclose(mean[0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(mean[1], torch.tensor([0.0, 1.0]))


def test_token_shaped_outputs_are_normalised_over_the_whole_row():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mean = average_normalised([a, b])
    assert mean.shape == (2, 3, 4)
    flat = lambda x: x.reshape(2, -1) / x.reshape(2, -1).norm(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(mean.reshape(2, -1), (flat(a) + flat(b)) / 2, atol=1e-6)


def test_members_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        average_normalised([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="at least one"):
        average_normalised([])
