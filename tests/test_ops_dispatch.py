"""Dispatch (``sparselm.ops.dispatch``): rows are the tokens' copies in expert order; the backward sums each
token's row gradients, by gathers when nothing was dropped and by ``index_add`` otherwise, both equal to autograd
through plain indexing."""

from __future__ import annotations

import pytest
import torch

from sparselm.ops import dispatch, permute


@pytest.mark.parametrize("capacity", [None, 2], ids=["dropless", "capacity"])
def test_dispatch_matches_indexing_forward_and_backward(capacity: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    experts = torch.randint(0, 3, (6, 2), generator=gen)
    experts[:, 1] = (experts[:, 0] + 1) % 3  # two different experts per token
    perm = permute(experts, torch.bincount(experts.flatten(), minlength=3), capacity)
    assert (perm.inverse is None) == (capacity is not None)
    x = torch.randn(6, 5, generator=gen, requires_grad=True)
    rows = dispatch(x, perm)
    ref = x[perm.token_of_row]
    assert torch.equal(rows, ref)
    upstream = torch.randn(rows.shape, generator=gen)
    (got,) = torch.autograd.grad(rows, x, upstream)
    (want,) = torch.autograd.grad(ref, x, upstream)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if capacity is not None:
        dropped_tokens = set(range(6)) - set(perm.token_of_row.tolist())
        for t in dropped_tokens:
            assert torch.equal(got[t], torch.zeros(5))  # a token without rows gets no gradient
