"""Recycled gradient memory (``sparselm.ops.GradBuffers``): reused only once nobody holds it, never more than
``MAX_BUFFERS`` per weight, and off when the kernel's settings say so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expert_reference import as_args, expert_weights
from sparselm.ops import ExpertLoop, ExpertLoopSettings, GradBuffers
from sparselm.ops.grad_buffers import MAX_BUFFERS, can_recycle

needs_use_count = pytest.mark.skipif(not can_recycle(), reason="this torch has no storage use count")


def _users(t: torch.Tensor) -> int:
    """Holders of ``t``'s memory, besides the temporary storage object this call makes."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


@needs_use_count
def test_buffers_are_reused_only_when_nobody_holds_them() -> None:
    assert MAX_BUFFERS == 2  # the steps below are written for two kept buffers
    buffers = GradBuffers()
    param = nn.Parameter(torch.zeros(3, 4))
    a = buffers.get(param)
    ptr_a = a.data_ptr()
    assert a.shape == param.shape and a.is_contiguous() and _users(a) == 2  # ``a`` and the kept owner
    b = buffers.get(param)  # ``a`` is alive: new memory, kept as the second buffer
    ptr_b = b.data_ptr()
    c = buffers.get(param)  # both alive and MAX_BUFFERS kept: a plain allocation, not kept
    assert len({ptr_a, ptr_b, c.data_ptr()}) == 3 and _users(c) == 1
    del a, c
    d = buffers.get(param)  # ``a`` dropped: its memory comes back
    assert d.data_ptr() == ptr_a
    view = b.view(-1)
    del b
    e = buffers.get(param)  # ``d`` holds the first buffer and a view of ``b`` the second: neither is handed out
    assert e.data_ptr() not in {ptr_a, ptr_b}
    del view
    assert buffers.get(param).data_ptr() == ptr_b
    del d
    # Buffers belong to one parameter: another of the same shape never gets them.
    other = nn.Parameter(torch.zeros(3, 4))
    assert buffers.get(other).data_ptr() not in {ptr_a, ptr_b}


@needs_use_count
def test_disabled_buffers_keep_no_memory() -> None:
    buffers = GradBuffers(enabled=False)
    param = nn.Parameter(torch.zeros(3, 4))
    assert not buffers.enabled and _users(buffers.get(param)) == 1
    loop = ExpertLoop(ExpertLoopSettings(reuse_grad_buffers=False))
    assert not loop.grad_buffers.enabled and ExpertLoop().grad_buffers.enabled
    counts = torch.tensor([5, 0, 6])
    w = expert_weights(len(counts), 8, 16)
    x = torch.randn(11, 8)
    loop(x, None, counts, *as_args(w)).sum().backward()
    assert _users(w["w_up"].grad) == 1  # the gradient alone holds its memory


@needs_use_count
def test_recycled_gradient_buffers_never_overwrite_live_gradients() -> None:
    # The loop kernel writes expert weight gradients into memory recycled from earlier steps; it may only do so
    # once nobody holds that memory.
    counts = torch.tensor([9, 0, 14, 7, 10])
    w = expert_weights(len(counts), 32, 64)
    loop = ExpertLoop(ExpertLoopSettings(threads=1))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(int(counts.sum()), 32, generator=gen)
    gates = torch.rand(int(counts.sum()), generator=gen)
    w_up = w["w_up"]

    def out() -> torch.Tensor:
        return loop(x, gates, counts, *as_args(w))

    ups = [torch.randn(int(counts.sum()), 32, generator=gen) for _ in range(3)]
    expected = [torch.autograd.grad(out(), w_up, up)[0].clone() for up in ups]

    def zero_grad() -> None:
        for p in w.values():
            if p is not None:
                p.grad = None

    # Accumulation over micro-batches: .grad stays alive, so the second backward must not write into it.
    zero_grad()
    out().backward(ups[0])
    out().backward(ups[1])
    torch.testing.assert_close(w_up.grad, expected[0] + expected[1], rtol=1e-5, atol=1e-6)

    # After zero_grad(set_to_none) the memory is recycled (same storage: the page faults are saved) ...
    zero_grad()
    out().backward(ups[0])
    first = w_up.grad.data_ptr()
    zero_grad()
    out().backward(ups[1])
    assert w_up.grad.data_ptr() == first
    torch.testing.assert_close(w_up.grad, expected[1], rtol=1e-5, atol=1e-6)
    # ... but not while anything, even a view, still refers to it.
    kept = w_up.grad.view(-1)
    zero_grad()
    out().backward(ups[2])
    assert w_up.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept.view_as(w_up), expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_up.grad, expected[2], rtol=1e-5, atol=1e-6)
