"""Helpers shared by the tests of the expert ops: random expert weights, the expert FFN written from its
definition, one expert and one matmul at a time (what a textbook would do), and a kernel's check against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_NAMES = ("w_up", "w_gate", "w_down", "b_up", "b_down")


def expert_weights(
    num_experts: int, d: int, f: int, kind: str = "swiglu", bias: bool = False, seed: int = 0
) -> dict[str, nn.Parameter | None]:
    """Random weights (std 0.2: outputs are O(1)) laid out as in ``Experts``; None where ``kind``/``bias`` has none."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(*shape, generator=gen) * 0.2)

    return {
        "w_up": param(num_experts, d, f),
        "w_gate": param(num_experts, d, f) if kind == "swiglu" else None,
        "w_down": param(num_experts, f, d),
        "b_up": param(num_experts, f) if bias else None,
        "b_down": param(num_experts, d) if bias else None,
    }


def as_args(w: dict[str, nn.Parameter | None]) -> tuple:
    return tuple(w[n] for n in WEIGHT_NAMES)


def params(w: dict[str, nn.Parameter | None]) -> list[nn.Parameter]:
    return [p for p in as_args(w) if p is not None]


def textbook_experts(
    x: torch.Tensor, gates: torch.Tensor | None, counts: torch.Tensor, w: dict[str, nn.Parameter | None]
) -> torch.Tensor:
    """Rows ``x`` sorted by expert (``counts`` rows each) through their expert's FFN, scaled by ``gates``."""
    out = []
    for e, rows in enumerate(x.split(counts.tolist())):
        h = rows @ w["w_up"][e]
        if w["b_up"] is not None:
            h = h + w["b_up"][e]
        h = F.silu(rows @ w["w_gate"][e]) * h if w["w_gate"] is not None else F.gelu(h, approximate="tanh")
        y = h @ w["w_down"][e]
        if w["b_down"] is not None:
            y = y + w["b_down"][e]
        out.append(y)
    y = torch.cat(out)
    return y if gates is None else y * gates.unsqueeze(-1)


def check_against_textbook(kernel, counts: torch.Tensor, d: int, f: int, kind: str, bias: bool, gated: bool, seed: int):
    """Run ``kernel`` (the expert ops' call) and the textbook experts on the same random rows, gates and weights;
    assert their outputs (rtol 1e-5) and gradients (rtol 1e-4) agree -> the kernel's weight gradients, in order."""
    w = expert_weights(len(counts), d, f, kind, bias)
    gen = torch.Generator().manual_seed(seed)
    m = int(counts.sum())
    x = torch.randn(m, d, generator=gen, requires_grad=True)
    gates = torch.rand(m, generator=gen, requires_grad=True) if gated else None
    upstream = torch.randn(m, d, generator=gen)
    out = kernel(x, gates, counts, *as_args(w))
    ref = textbook_experts(x, gates, counts, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    inputs = [x, *([gates] if gated else []), *params(w)]
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(ref, inputs, upstream)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return got[len(inputs) - len(params(w)) :]
