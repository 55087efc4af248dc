"""Dispatch: gather each token's rows into the expert-sorted layout (``rows = x[token_of_row]``).

The backward sums each token's k row gradients. When no assignment was dropped (dropless) it gathers them through
the inverse permutation: no scatter, no atomics, deterministic. Otherwise it scatters with ``index_add``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparselm.ops.permute import Permutation


def dispatch(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """``x`` [T, d] -> rows [M, d] sorted by expert."""
    return _Dispatch.apply(x, perm.token_of_row, perm.inverse, perm.top_k)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_row, inverse, top_k):
        ctx.save_for_backward(token_of_row, inverse)
        ctx.top_k = top_k
        ctx.x_shape = x.shape
        return x.index_select(0, token_of_row)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        token_of_row, inverse = ctx.saved_tensors
        if inverse is not None:
            dx = grad.index_select(0, inverse).view(ctx.top_k, ctx.x_shape[0], grad.shape[-1]).sum(0)
        else:
            dx = grad.new_zeros(ctx.x_shape).index_add_(0, token_of_row, grad)
        return dx, None, None, None
