"""Mixture-of-Experts FFN: route, sort tokens by expert, run every expert on its contiguous block of rows, combine.

Expert weights are 3-D parameters ``[num_experts, d_in, d_out]`` so that FSDP and expert parallelism can shard
dim 0. There is never a Python loop over tokens. The kernels are ops in :mod:`sparselm.ops`; three expert kernels
compute the same thing (``Experts.impl``), and a fourth serves decoding:

- ``"loop"`` (the default on CPU): :class:`sparselm.ops.ExpertLoop`, a custom autograd Function that walks the
  experts, casting one expert's weights at a time, writing the weight gradients in place and folding the gates in.
- ``"grouped_mm"`` (the default elsewhere): :func:`sparselm.ops.grouped_experts`, plain autograd through
  ``torch.nn.functional.grouped_mm``, for GPUs where a Python loop over experts would be launch-bound.
- ``"padded"``: :func:`sparselm.ops.padded_experts`, one batched matmul per projection over rows padded to the
  busiest expert. On CPU "auto" picks it without gradients (serving, generation) when the weights are already in
  the compute dtype and the padding is small (``sparselm.ops.prefer_padded``, against the loop's per-expert cost):
  decoding steps, where the loop pays per expert for a few rows each.
- ``"rows"``: :func:`sparselm.ops.row_experts`, C++ kernels that read each busy expert's weights once per 4 of its
  rows and skip idle experts. "auto" picks it before "padded" under the same conditions when it reads less than
  the padded kernel would (``sparselm.ops.prefer_rows``: decoding steps) and the kernels are built.

Two modes:
- dropless (default): every token reaches its top-k experts, however unbalanced the routing.
- capacity: each expert takes at most ``ceil(capacity_factor * tokens * k / E)`` assignments. First choices win
  over second choices, then earlier tokens over later ones (GShard's priority). A dropped assignment contributes
  nothing, so a token whose every choice was dropped passes through the block's residual connection unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparselm.config import MoEConfig
from sparselm.model.layers import FeedForward
from sparselm.model.router import Router
from sparselm.ops import (
    ExpertLoop,
    combine,
    default_expert_loop,
    dispatch,
    grouped_experts,
    padded_experts,
    permute,
    prefer_padded,
    prefer_rows,
    row_experts,
)
from sparselm.ops.row_matmul import applies


@dataclass
class MoEStats:
    """What one MoE layer did in one forward; returned explicitly, never stored in globals."""

    aux_loss: torch.Tensor  # scalar, Switch load-balancing loss (coefficient not applied)
    z_loss: torch.Tensor  # scalar, router z-loss (coefficient not applied)
    tokens_per_expert: torch.Tensor  # [E] assignments chosen by the router (before dropping)
    dropped: torch.Tensor  # scalar int64, assignments dropped for lack of capacity


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (it covers neither grouped_mm nor the loop), else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Experts(nn.Module):
    """E independent FFNs stored as 3-D weights. SwiGLU: gate/up [E, d_model, d_ff], down [E, d_ff, d_model].

    ``impl`` picks the kernel: "auto" (on CPU the loop, or for inference the rows or padded kernel when experts hold
    few rows; grouped_mm elsewhere), "loop", "grouped_mm", "padded" or "rows"; all agree.
    ``loop`` is the loop kernel with its settings (default: the process's, from the environment).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        kind: str = "swiglu",
        bias: bool = False,
        loop: ExpertLoop | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.impl = "auto"
        self.loop = loop if loop is not None else default_expert_loop()
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if kind == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_up = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def kernel_for(self, x: torch.Tensor, counts: torch.Tensor) -> str:
        """The kernel ``impl`` means for these rows (``x`` in the compute dtype, ``counts`` [E] rows per expert)."""
        if self.impl != "auto":
            return self.impl
        if x.device.type != "cpu":
            return "grouped_mm"
        rows = counts.tolist()
        if torch.is_grad_enabled() or self.w_up.dtype != x.dtype:
            return "loop"
        if applies(x, self.w_up) and prefer_rows(rows):
            return "rows"
        return "padded" if prefer_padded(rows, x.dtype, self.w_up.shape[1] * self.w_up.shape[2]) else "loop"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """``x`` [M, d_model] sorted by expert, ``counts`` [E] rows per expert, ``gates`` [M] scaling each row's
        output (None: unscaled) -> [M, d_model] in the compute dtype (the autocast dtype if autocast is on)."""
        x = x.to(compute_dtype(x))
        weights = (self.w_up, self.w_gate, self.w_down, self.b_up, self.b_down)
        impl = self.kernel_for(x, counts)
        if impl == "rows":
            return row_experts(x, gates, counts, *weights)
        if impl == "loop":
            return self.loop(x, gates, counts, *weights)
        if impl == "grouped_mm":
            return grouped_experts(x, gates, counts, *weights)
        if impl == "padded":
            return padded_experts(x, gates, counts, *weights)
        raise ValueError(
            f"unknown experts impl {self.impl!r}: expected 'auto', 'loop', 'grouped_mm', 'padded' or 'rows'"
        )


class MoE(nn.Module):
    """Router, ``Experts`` (any module with the same call, e.g. the expert-parallel one) and an optional shared expert.

    ``d_ff`` is the width of each expert (and of the shared expert); ``kind`` "swiglu" or "gelu"."""

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, kind: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.dropless = cfg.dropless
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.router = Router(
            d_model, cfg.num_experts, cfg.top_k, cfg.renormalize, cfg.jitter, cfg.router_init_std, cfg.top1_gate
        )
        self.experts = Experts(cfg.num_experts, d_model, d_ff, kind, bias)
        self.shared = FeedForward(d_model, d_ff, kind, bias) if cfg.shared_expert else None

    def capacity(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return math.ceil(factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """``x`` [..., d_model]; ``valid`` [...] False for padding, which is neither routed nor counted (padding
        would otherwise take capacity from real tokens and skew the load statistics and aux losses)."""
        if valid is not None and not bool(valid.all()):
            keep = valid.flatten()
            flat = x.flatten(0, -2)
            routed, stats = self._route_and_compute(flat[keep])
            out = torch.zeros(flat.shape[0], flat.shape[1], dtype=routed.dtype, device=x.device)
            out[keep] = routed
            return out.unflatten(0, x.shape[:-1]), stats
        out, stats = self._route_and_compute(x.flatten(0, -2))
        return out.unflatten(0, x.shape[:-1]), stats

    def _route_and_compute(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """Route, dispatch, compute and combine the tokens ``x`` [T, d_model]."""
        route = self.router(x)
        capacity = None if self.dropless else self.capacity(x.shape[0])
        perm = permute(route.experts, route.tokens_per_expert, capacity)
        # Cast before the gather: k times fewer bytes to convert and half the bytes to move under bf16.
        rows = dispatch(x.to(compute_dtype(x)), perm)
        y_rows = self.experts(rows, perm.counts, perm.rows_of(route.weights))  # gated by the experts
        out = combine(y_rows, perm)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, MoEStats(route.aux_loss, route.z_loss, route.tokens_per_expert, perm.dropped)
