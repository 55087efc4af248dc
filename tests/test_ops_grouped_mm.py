"""The grouped_mm expert path (``sparselm.ops.grouped_matmul`` / ``grouped_experts``): per-group matmuls, empty
groups, the fallback for shapes grouped_mm rejects, and agreement with the textbook experts and the loop kernel."""

from __future__ import annotations

import pytest
import torch

from expert_reference import as_args, expert_weights, params, textbook_experts
from sparselm.ops import ExpertLoop, ExpertLoopSettings, grouped_experts, grouped_matmul


def test_grouped_matmul_matches_per_group_matmuls_including_empty_groups() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    for k_dim, n_dim in [(32, 16), (6, 10)]:  # grouped_mm kernel, then the unaligned fallback
        x = torch.randn(int(counts.sum()), k_dim)
        w = torch.randn(4, k_dim, n_dim)
        expected = torch.cat([p @ w[g] for g, p in enumerate(x.split(counts.tolist()))])
        torch.testing.assert_close(grouped_matmul(x, w, counts), expected)


@pytest.mark.parametrize(("d", "f"), [(32, 64), (6, 10)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_grouped_experts_match_the_textbook_experts_and_the_loop(kind: str, bias: bool, d: int, f: int) -> None:
    counts = torch.tensor([7, 0, 12, 3, 9])
    w = expert_weights(len(counts), d, f, kind, bias)
    gen = torch.Generator().manual_seed(2)
    m = int(counts.sum())
    x = torch.randn(m, d, generator=gen, requires_grad=True)
    gates = torch.rand(m, generator=gen, requires_grad=True)
    upstream = torch.randn(m, d, generator=gen)
    inputs = [x, gates, *params(w)]
    results = {
        "grouped": grouped_experts(x, gates, counts, *as_args(w)),
        "loop": ExpertLoop(ExpertLoopSettings(threads=1))(x, gates, counts, *as_args(w)),
    }
    ref = textbook_experts(x, gates, counts, w)
    want = torch.autograd.grad(ref, inputs, upstream)
    for name, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        for a, b in zip(torch.autograd.grad(out, inputs, upstream), want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
