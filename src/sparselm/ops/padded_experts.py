"""The expert FFN as three batched matmuls over rows padded per expert: the kernel for few rows per expert.

Rows sorted by expert are placed in an ``[E, C, d_in]`` tensor, C being the busiest expert's row count and the other
slots zero, and each projection is one ``torch.bmm`` over all experts. Every expert's weights are read once, in
one call, whether it has rows or not, and the padding rows are computed for nothing. So it pays where the loop
kernel (:mod:`sparselm.ops.expert_loop`) is dominated by its per-expert calls: most experts hold a few rows each,
as when a serving engine decodes a batch of sequences (one token each). ``prefer_padded`` is the rule; the
measurements behind it are in docs/benchmarks.md. Plain autograd, no saved state of its own: meant for inference,
where nothing needs its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Padded rows (E * C) may be up to this many times the real rows before the per-expert loop is preferred: fewer in
# fp32, whose matmuls cost 2-3x bf16's per row on CPU, so wasted rows cost more (docs/benchmarks.md, "The decode step").
MAX_PADDING_FACTOR = {torch.bfloat16: 4, torch.float32: 2}
# What the loop pays per expert beyond its rows' work (separate small matmuls), in multiply-adds of one projection:
# the padded kernel's wasted rows may cost up to this much per expert. On the d512 shape (512 x 704) that is ~44 rows
# per expert, so a prompt chunk of 2,048 tokens must be nearly balanced to be padded (docs/benchmarks.md, "Padded
# rows in prompt chunks").
LOOP_OVERHEAD_MACS = {torch.bfloat16: 16_000_000, torch.float32: 8_000_000}


def prefer_padded(counts: list[int], dtype: torch.dtype = torch.bfloat16, row_macs: int = 0) -> bool:
    """Whether the padded kernel should run for these rows per expert in ``dtype``: the padded rows, every expert's
    busiest count, stay under ``MAX_PADDING_FACTOR`` times the real ones, and (given ``row_macs``, one row's
    multiply-adds in one projection, d_in x d_ff) the wasted rows' work stays under the loop's per-expert overhead
    ``LOOP_OVERHEAD_MACS``. One token's top-k (most experts idle), a skewed routing of a long prompt (one busy expert)
    and a large prompt chunk padded by more than a few dozen rows per expert all go to the loop."""
    rows = sum(counts)
    if rows == 0:
        return False
    padded = len(counts) * max(counts)
    if padded >= MAX_PADDING_FACTOR.get(dtype, 2) * rows:
        return False
    return (padded - rows) * row_macs <= LOOP_OVERHEAD_MACS.get(dtype, LOOP_OVERHEAD_MACS[torch.float32]) * len(counts)


def padded_experts(x, gates, counts, w_up, w_gate, w_down, b_up, b_down) -> torch.Tensor:
    """Same arguments and result as :class:`sparselm.ops.ExpertLoop` (``counts`` a tensor or a list): ``x`` [M, d_in]
    sorted by expert -> [M, d_in] in ``x``'s dtype; weights are cast to it whole."""
    dtype = x.dtype
    counts = torch.as_tensor(counts, device=x.device)
    num_experts = counts.numel()
    capacity = int(counts.max()) if x.shape[0] else 0
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
    first_row = torch.cumsum(counts, 0) - counts
    slot = expert_of_row * capacity + torch.arange(x.shape[0], device=x.device) - first_row[expert_of_row]
    padded = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, slot, x)
    padded = padded.view(num_experts, capacity, x.shape[1])
    h = torch.bmm(padded, w_up.to(dtype))
    if b_up is not None:
        h = h + b_up.to(dtype).unsqueeze(1)
    h = F.silu(torch.bmm(padded, w_gate.to(dtype))) * h if w_gate is not None else F.gelu(h, approximate="tanh")
    y = torch.bmm(h, w_down.to(dtype))
    if b_down is not None:
        y = y + b_down.to(dtype).unsqueeze(1)
    y = y.flatten(0, 1).index_select(0, slot)
    if gates is not None:
        y = y * gates.to(dtype).unsqueeze(-1)
    return y
