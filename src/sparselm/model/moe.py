"""Mixture-of-Experts FFN: route, sort tokens by expert, run all experts in grouped matmuls, combine.

Expert weights are 3-D parameters ``[num_experts, d_in, d_out]`` so that FSDP and expert parallelism can shard
dim 0. There is no Python loop over tokens or experts on the main path: ``torch.nn.functional.grouped_mm`` takes the
expert-sorted tokens and the per-expert offsets in one call per projection.

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
import torch.nn.functional as F
from torch import nn

from sparselm.model.layers import FeedForward
from sparselm.model.router import Router


@dataclass
class MoEStats:
    """What one MoE layer did in one forward; returned explicitly, never stored in globals."""

    aux_loss: torch.Tensor  # scalar, Switch load-balancing loss (coefficient not applied)
    z_loss: torch.Tensor  # scalar, router z-loss (coefficient not applied)
    tokens_per_expert: torch.Tensor  # [E] assignments chosen by the router (before dropping)
    dropped: torch.Tensor  # scalar int64, assignments dropped for lack of capacity


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


class Experts(nn.Module):
    """E independent FFNs stored as 3-D weights. SwiGLU: gate/up [E, d_model, d_ff], down [E, d_ff, d_model]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, kind: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if kind == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_up = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` [M, d_model] sorted by expert, ``counts`` [E] rows per expert -> [M, d_model]."""
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            # autocast does not cover grouped_mm: cast inputs and weights to the autocast dtype ourselves.
            dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        rows_expert = None
        if self.b_up is not None:
            rows_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
        h = grouped_matmul(x, self.w_up.to(dtype), counts)
        if self.b_up is not None:
            h = h + self.b_up.to(dtype)[rows_expert]
        if self.w_gate is not None:
            h = F.silu(grouped_matmul(x, self.w_gate.to(dtype), counts)) * h
        else:
            h = F.gelu(h, approximate="tanh")
        y = grouped_matmul(h, self.w_down.to(dtype), counts)
        if self.b_down is not None:
            y = y + self.b_down.to(dtype)[rows_expert]
        return y


class MoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        kind: str = "swiglu",
        bias: bool = False,
        dropless: bool = True,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        renormalize: bool = True,
        jitter: float = 0.0,
        shared_expert: bool = False,
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.dropless = dropless
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router = Router(d_model, num_experts, top_k, renormalize, jitter, router_init_std)
        self.experts = Experts(num_experts, d_model, d_ff, kind, bias)
        self.shared = FeedForward(d_model, d_ff, kind, bias) if shared_expert else None

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
        num_tokens = x.shape[0]
        route = self.router(x)

        # Assignment a = choice * T + token ("choice-major"), so a stable sort by expert keeps first choices ahead
        # of second choices and earlier tokens ahead of later ones within each expert.
        experts_flat = route.experts.t().flatten()
        weights_flat = route.weights.t().flatten()
        order = torch.argsort(experts_flat, stable=True)
        counts = route.tokens_per_expert
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        if not self.dropless:
            cap = self.capacity(num_tokens)
            starts = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(order.numel(), device=x.device) - starts[experts_flat[order]]
            order = order[rank_in_expert < cap]
            kept = counts.clamp(max=cap)
            dropped = counts.sum() - kept.sum()
            counts = kept
        token_of_row = order % num_tokens

        y_rows = self.experts(x[token_of_row], counts)
        y_rows = y_rows * weights_flat[order].unsqueeze(-1).to(y_rows.dtype)
        out = torch.zeros(num_tokens, x.shape[-1], dtype=y_rows.dtype, device=x.device)
        out.index_add_(0, token_of_row, y_rows)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, MoEStats(route.aux_loss, route.z_loss, route.tokens_per_expert, dropped)
