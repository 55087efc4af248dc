"""The expert FFN through ``torch.nn.functional.grouped_mm``: one call per projection over all experts, plain autograd.

The path for GPUs, where a Python loop over experts would be launch-bound; it computes what the CPU loop kernel
(:mod:`sparselm.ops.expert_loop`) computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _grouped_mm_ok(*dims: int, dtype: torch.dtype) -> bool:
    # grouped_mm wants every row stride to be a multiple of 16 bytes.
    itemsize = torch.finfo(dtype).bits // 8
    return all((d * itemsize) % 16 == 0 for d in dims)


@torch.compiler.disable
def _grouped_mm_eager(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, w, offs=offsets)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] are sorted by group with ``counts`` [G] rows each; returns ``x_g @ w[g]`` -> [M, N]."""
    if _grouped_mm_ok(x.shape[-1], w.shape[-1], dtype=x.dtype):
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            # torch.compile traces grouped_mm on CPU only in bf16; run fp32 eagerly (a graph break, not an error).
            return _grouped_mm_eager(x, w, offsets)
        return F.grouped_mm(x, w, offs=offsets)
    # Fallback for shapes grouped_mm rejects (tiny test models): one matmul per expert, weights unbound once.
    pieces = torch.split(x, counts.tolist(), dim=0)
    return torch.cat([p @ wg for p, wg in zip(pieces, w.unbind(0), strict=True)], dim=0)


def grouped_experts(x, gates, counts, w_up, w_gate, w_down, b_up, b_down) -> torch.Tensor:
    """Same arguments and result as :class:`sparselm.ops.ExpertLoop`: weights are cast to ``x``'s dtype whole."""
    dtype = x.dtype
    rows_expert = None
    if b_up is not None or b_down is not None:
        rows_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    h = grouped_matmul(x, w_up.to(dtype), counts)
    if b_up is not None:
        h = h + b_up.to(dtype)[rows_expert]
    h = F.silu(grouped_matmul(x, w_gate.to(dtype), counts)) * h if w_gate is not None else F.gelu(h, approximate="tanh")
    y = grouped_matmul(h, w_down.to(dtype), counts)
    if b_down is not None:
        y = y + b_down.to(dtype)[rows_expert]
    if gates is not None:
        y = y * gates.to(dtype).unsqueeze(-1)
    return y
