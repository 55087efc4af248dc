"""Combine (``sparselm.ops.combine``): each token's output is the sum of its rows, by gathers when nothing was
dropped and by ``index_add`` otherwise (a token with no row left gets zeros); the backward is a gather. Both equal
autograd through a plain ``index_add``."""

from __future__ import annotations

import pytest
import torch

from sparselm.ops import combine, permute


@pytest.mark.parametrize("capacity", [None, 2], ids=["dropless", "capacity"])
def test_combine_matches_index_add_forward_and_backward(capacity: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0], [0, 1]])
    perm = permute(experts, torch.bincount(experts.flatten(), minlength=3), capacity)
    rows = torch.randn(perm.order.numel(), 4, generator=gen, requires_grad=True)
    out = combine(rows, perm)
    ref = torch.zeros(5, 4).index_add(0, perm.token_of_row, rows)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(5, 4, generator=gen)
    (got,) = torch.autograd.grad(out, rows, upstream)
    (want,) = torch.autograd.grad(ref, rows, upstream)
    assert torch.equal(got, want)
    if capacity is not None:
        # Token 4 arrives last: expert 0 is full (tokens 0, 1) and expert 1 too (tokens 0, 2), so it passes through.
        assert 4 not in perm.token_of_row.tolist() and torch.equal(out[4], torch.zeros(4))
