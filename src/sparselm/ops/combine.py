"""Combine: sum each token's (already gated) expert rows back into one output per token.

When no assignment was dropped the rows are gathered through the inverse permutation and summed over the k choices
(no scatter, deterministic); otherwise they are scattered with ``index_add``, and a token whose every choice was
dropped gets zeros. The backward is a plain gather.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparselm.ops.permute import Permutation


def combine(rows: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """rows [M, d] sorted by expert -> [T, d]."""
    return _Combine.apply(rows, perm.token_of_row, perm.inverse, perm.top_k, perm.num_tokens)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, token_of_row, inverse, top_k, num_tokens):
        ctx.save_for_backward(token_of_row)
        if inverse is not None:
            # Choice-major assignments: the inverse permutation lays the rows out as [k, T, d].
            return rows.index_select(0, inverse).view(top_k, num_tokens, rows.shape[-1]).sum(0)
        return rows.new_zeros(num_tokens, rows.shape[-1]).index_add_(0, token_of_row, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (token_of_row,) = ctx.saved_tensors
        return grad.index_select(0, token_of_row), None, None, None, None
