"""MoE layer: capacity and dropping on hand-built routings, equivalence with the dense FFN, and agreement with a plain
per-expert reference loop (outputs and gradients) on every expert implementation.

Expert implementations (``Experts.impl``): "loop" (the CPU kernel: one fused pass per expert inside a custom
autograd Function) and "grouped_mm" (autograd through ``torch.nn.functional.grouped_mm``, the path for GPUs; it falls
back to per-expert matmuls when the dims are not 16-byte aligned, e.g. d_model 6).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparselm.model.layers import FeedForward
from sparselm.model.moe import MoE, grouped_matmul

IMPLS = ["loop", "grouped_mm"]


def make_moe(
    d: int, f: int, num_experts: int, top_k: int, impl: str, *, seed: int = 0, router_std: float = 1.0, **kwargs
) -> MoE:
    """An MoE with random experts (std 0.2, so outputs are O(1)) and a router sharp enough to route unevenly."""
    torch.manual_seed(seed)
    moe = MoE(d, f, num_experts, top_k, router_init_std=router_std, **kwargs)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(std=0.2)
    moe.experts.impl = impl
    return moe


def expert_ffn(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` applied to rows ``x``, written directly from the definition (what a textbook would do)."""
    ex = moe.experts
    h = x @ ex.w_up[e]
    if ex.b_up is not None:
        h = h + ex.b_up[e]
    h = F.silu(x @ ex.w_gate[e]) * h if ex.w_gate is not None else F.gelu(h, approximate="tanh")
    y = h @ ex.w_down[e]
    if ex.b_down is not None:
        y = y + ex.b_down[e]
    return y


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Dropless MoE as a loop over experts: every token's k choices, each weighted by its gate."""
    route = moe.router(x)
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):
        token, slot = (route.experts == e).nonzero(as_tuple=True)
        if token.numel():
            out = out.index_add(0, token, expert_ffn(moe, e, x[token]) * route.weights[token, slot].unsqueeze(-1))
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out


def grads(out: torch.Tensor, upstream: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, upstream, allow_unused=False))


def dense_from(moe: MoE, ffn: FeedForward) -> None:
    """Give every expert of ``moe`` the weights of the dense ``ffn`` (nn.Linear stores [out, in]: transpose)."""
    ex = moe.experts
    with torch.no_grad():
        ex.w_up.copy_(ffn.up.weight.t().expand_as(ex.w_up))
        ex.w_down.copy_(ffn.down.weight.t().expand_as(ex.w_down))
        if ex.w_gate is not None:
            ex.w_gate.copy_(ffn.gate.weight.t().expand_as(ex.w_gate))
        if ex.b_up is not None:
            ex.b_up.copy_(ffn.up.bias.expand_as(ex.b_up))
            ex.b_down.copy_(ffn.down.bias.expand_as(ex.b_down))


# ---------------------------------------------------------------------------------------------------------- capacity


@pytest.mark.parametrize(
    ("factor", "tokens", "top_k", "num_experts", "expected"),
    [(1.25, 10, 2, 4, 7), (1.0, 8, 1, 4, 2), (2.0, 7, 2, 3, 10), (1.0, 64, 2, 8, 16), (0.5, 3, 1, 2, 1)],
)
def test_capacity_formula(factor: float, tokens: int, top_k: int, num_experts: int, expected: int) -> None:
    moe = MoE(8, 16, num_experts, top_k, dropless=False, capacity_factor=factor, eval_capacity_factor=2 * factor)
    assert expected == math.ceil(factor * tokens * top_k / num_experts)
    assert moe.train().capacity(tokens) == expected
    assert moe.eval().capacity(tokens) == math.ceil(2 * factor * tokens * top_k / num_experts)


def routed_setup(impl: str, first: list[list[float]], which: torch.Tensor, **kwargs) -> tuple[MoE, torch.Tensor]:
    """8 tokens, 4 experts, top-2. Router logits depend only on feature ``which[t]`` (set to 1), whose router column
    is ``first[which[t]]``: the routing is fixed by hand while the other features make every token's input distinct."""
    moe = make_moe(8, 16, 4, 2, impl, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(8, 8)
    x[:, :2] = 0.0
    x[torch.arange(8), which] = 1.0
    with torch.no_grad():
        moe.router.weight.zero_()
        for col, logits in enumerate(first):
            moe.router.weight[:, col] = torch.tensor(logits)
    return moe.train(), x


def expected_output(moe: MoE, x: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
    """Output when token t keeps exactly the choices ``kept[t]`` (indices into its top-k), gates not renormalised."""
    route = moe.router(x)
    out = torch.zeros_like(x)
    for t, slots in enumerate(kept):
        for j in slots:
            e = int(route.experts[t, j])
            out[t] += route.weights[t, j] * expert_ffn(moe, e, x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_earlier_tokens_win_and_fully_dropped_tokens_pass_through(impl: str) -> None:
    # Every token ranks expert 0 first and expert 1 second; capacity ceil(1.0 * 8 * 2 / 4) = 4 per expert.
    moe, x = routed_setup(impl, [[3.0, 2.0, 1.0, 0.0]], torch.zeros(8, dtype=torch.int64), dropless=False,
                          capacity_factor=1.0)  # fmt: skip
    x.requires_grad_(True)
    out, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [8, 8, 0, 0]  # counted before dropping
    assert int(stats.dropped) == 8  # 4 of the 8 assignments to each of experts 0 and 1
    # Tokens 0-3 arrived first and keep both choices; tokens 4-7 lose both.
    expected = expected_output(moe, x.detach(), [[0, 1]] * 4 + [[]] * 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[4:], torch.zeros(4, 8))
    # In a residual block a fully dropped token passes through bit for bit ...
    block = x + out
    assert torch.equal(block[4:], x[4:])
    # ... and the MoE sends it no gradient at all (neither through the experts nor through the gates).
    (out * torch.randn_like(out)).sum().backward()
    assert torch.equal(x.grad[4:], torch.zeros(4, 8))
    assert x.grad[:4].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_first_choices_beat_earlier_second_choices(impl: str) -> None:
    # Tokens 0-3 rank expert 1 then 0; tokens 4-7 rank expert 0 then 1. Capacity ceil(1.5 * 8 * 2 / 4) = 6.
    which = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    moe, x = routed_setup(impl, [[2.0, 3.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0]], which, dropless=False,
                          capacity_factor=1.5)  # fmt: skip
    out, stats = moe(x)
    route = moe.router(x)
    assert route.experts[:4].tolist() == [[1, 0]] * 4 and route.experts[4:].tolist() == [[0, 1]] * 4
    # Expert 0 gets 4 first choices (tokens 4-7) and 4 second choices (tokens 0-3): all first choices fit although
    # they come from later tokens, then the 2 remaining slots go to the earliest second choices (tokens 0 and 1).
    # Expert 1 mirrors it: first choices of tokens 0-3, then second choices of tokens 4 and 5.
    kept = [[0, 1], [0, 1], [0], [0], [0, 1], [0, 1], [0], [0]]
    assert int(stats.dropped) == 4
    torch.testing.assert_close(out, expected_output(moe, x, kept), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_capacity_and_dropless_drop_nothing(impl: str) -> None:
    zeros = torch.zeros(8, dtype=torch.int64)
    logits = [[3.0, 2.0, 1.0, 0.0]]
    # Eval capacity factor 2.0: ceil(2 * 8 * 2 / 4) = 8 = every assignment of the collapsed routing fits.
    moe, x = routed_setup(impl, logits, zeros, dropless=False, capacity_factor=1.0, eval_capacity_factor=2.0)
    out, stats = moe.eval()(x)
    assert int(stats.dropped) == 0
    torch.testing.assert_close(out, expected_output(moe, x, [[0, 1]] * 8), rtol=1e-5, atol=1e-6)
    # Dropless ignores capacity altogether, however collapsed the routing.
    moe, x = routed_setup(impl, logits, zeros, dropless=True, capacity_factor=0.1)
    out, stats = moe(x)
    assert int(stats.dropped) == 0
    assert stats.tokens_per_expert.tolist() == [8, 8, 0, 0]
    torch.testing.assert_close(out, expected_output(moe, x, [[0, 1]] * 8), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_experts_equal_the_dense_ffn(top_k: int, kind: str, bias: bool, impl: str) -> None:
    d, f, num_experts = 32, 64, 4
    torch.manual_seed(0)
    ffn = FeedForward(d, f, kind, bias)
    if bias:  # nn.Linear inits biases small but non-zero; make them clearly matter
        with torch.no_grad():
            ffn.up.bias.normal_()
            ffn.down.bias.normal_()
            if ffn.gate is not None:
                # Experts carry b_up and b_down only (no gate bias), so the dense twin must not use its gate bias.
                ffn.gate.bias.zero_()
    moe = make_moe(d, f, num_experts, top_k, impl, kind=kind, bias=bias)
    dense_from(moe, ffn)
    x = torch.randn(48, d, requires_grad=True)
    upstream = torch.randn(48, d)
    out, stats = moe(x)
    assert (stats.tokens_per_expert > 0).sum() >= 2  # several experts really took part
    dense = ffn(x)
    if top_k == 1:
        # A single gate is not renormalised (Switch), so the MoE scales the FFN by the token's top probability.
        dense = moe.router(x).weights * dense
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)

    ex = moe.experts
    moe_params = (
        [ex.w_up, ex.w_down] + ([ex.w_gate] if kind == "swiglu" else []) + ([ex.b_up, ex.b_down] if bias else [])
    )
    dense_params = [ffn.up.weight, ffn.down.weight] + ([ffn.gate.weight] if kind == "swiglu" else [])
    dense_params += [ffn.up.bias, ffn.down.bias] if bias else []
    g_moe = grads(out, upstream, [x, *moe_params])
    g_dense = grads(dense, upstream, [x, *dense_params])
    torch.testing.assert_close(g_moe[0], g_dense[0], rtol=1e-4, atol=1e-5)
    # The dense weight is shared by all experts in the sum: its gradient is the sum of the experts' gradients.
    for gm, gd in zip(g_moe[1:], g_dense[1:], strict=True):
        summed = gm.sum(0)
        torch.testing.assert_close(summed.t() if summed.dim() == 2 else summed, gd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_single_expert_moe_is_the_dense_ffn(kind: str, impl: str) -> None:
    torch.manual_seed(0)
    ffn = FeedForward(16, 48, kind)
    moe = make_moe(16, 48, 1, 1, impl, kind=kind)
    dense_from(moe, ffn)
    x = torch.randn(2, 10, 16, requires_grad=True)  # [batch, seq, d]: the layer flattens and restores the shape
    out, stats = moe(x)
    assert out.shape == x.shape
    assert int(stats.dropped) == 0 and stats.tokens_per_expert.tolist() == [20]
    dense = ffn(x)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)  # the one gate is softmax of one logit = 1
    upstream = torch.randn_like(out)
    g_moe = grads(out, upstream, [x, moe.experts.w_up, moe.experts.w_down, moe.router.weight])
    g_dense = grads(dense, upstream, [x, ffn.up.weight, ffn.down.weight])
    torch.testing.assert_close(g_moe[0], g_dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_moe[1][0].t(), g_dense[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_moe[2][0].t(), g_dense[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(g_moe[3], torch.zeros_like(g_moe[3]))  # a constant gate carries no router gradient


def uneven_moe(d: int, f: int, top_k: int, kind: str, bias: bool, impl: str) -> tuple[MoE, torch.Tensor]:
    """6 experts with a lopsided routing: expert 0 is favoured and expert 5 never chosen (feature 0 is constant)."""
    moe = make_moe(d, f, 6, top_k, impl, kind=kind, bias=bias, router_std=d**-0.5)
    torch.manual_seed(2)
    x = torch.randn(40, d)
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.router.weight[:, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, -50.0])
    return moe, x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("d", "f"), [(32, 64), (6, 10)], ids=["aligned", "unaligned"])
def test_matches_per_expert_reference_loop(d: int, f: int, top_k: int, kind: str, bias: bool, impl: str) -> None:
    moe, x = uneven_moe(d, f, top_k, kind, bias, impl)
    x.requires_grad_(True)
    out, stats = moe(x)
    counts = stats.tokens_per_expert.tolist()
    assert counts[5] == 0 and max(counts) >= 2 * min(c for c in counts if c > 0), counts
    ref = reference_moe(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    names = ["x", *(n for n, _ in moe.named_parameters())]
    params = [x, *moe.parameters()]
    got = dict(zip(names, grads(out, upstream, params), strict=True))
    want = dict(zip(names, grads(ref, upstream, params), strict=True))
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The expert nobody chose gets an exact zero gradient, not leftovers from uninitialised memory.
    for name in names:
        if name.startswith("experts."):
            assert torch.equal(got[name][5], torch.zeros_like(got[name][5])), name


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_mode_matches_reference_when_nothing_is_dropped(impl: str) -> None:
    moe, x = uneven_moe(32, 64, 2, "swiglu", False, impl)
    moe.dropless, moe.capacity_factor = False, 6.0  # capacity = all 80 assignments
    x.requires_grad_(True)
    out, stats = moe(x)
    assert int(stats.dropped) == 0
    ref = reference_moe(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    torch.testing.assert_close(grads(out, upstream, [x])[0], grads(ref, upstream, [x])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_expert_adds_the_dense_ffn(impl: str) -> None:
    moe, x = uneven_moe(32, 64, 2, "swiglu", False, impl)
    shared = make_moe(32, 64, 6, 2, impl, shared_expert=True)
    shared.load_state_dict(moe.state_dict(), strict=False)
    assert shared.shared is not None
    with torch.no_grad():
        for p in shared.shared.parameters():
            p.normal_(std=0.2)
    out_shared, _ = shared(x)
    out_plain, _ = moe(x)
    torch.testing.assert_close(out_shared, out_plain + shared.shared(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_shared, reference_moe(shared, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("d", "f"), [(32, 64), (6, 10)], ids=["aligned", "unaligned"])
def test_bf16_autocast_runs_and_is_close_to_fp32(d: int, f: int, impl: str) -> None:
    moe, x = uneven_moe(d, f, 2, "swiglu", True, impl)
    x.requires_grad_(True)
    upstream = torch.randn(40, d)
    out32, _ = moe(x)
    g32 = grads(out32, upstream, [x, moe.experts.w_up, moe.experts.w_down, moe.router.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, stats = moe(x)
    assert out16.dtype == torch.bfloat16
    g16 = grads(out16, upstream.bfloat16(), [x, moe.experts.w_up, moe.experts.w_down, moe.router.weight])
    assert all(g.dtype == torch.float32 for g in g16)  # fp32 master weights get fp32 gradients
    scale = out32.abs().max()
    torch.testing.assert_close(out16.float(), out32, rtol=0, atol=0.03 * scale.item())
    for a, b in zip(g16, g32, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.03 * b.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_with_expanded_upstream_gradient(impl: str) -> None:
    # out.sum().backward() hands the layer a stride-0 gradient, which grouped_mm's backward rejects unless the layer
    # makes it contiguous first (see /work/shared/PLATFORM.md).
    moe, x = uneven_moe(32, 64, 2, "swiglu", False, impl)
    x.requires_grad_(True)
    moe(x)[0].sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    reference_moe(moe, ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)


def test_grouped_matmul_matches_per_group_matmuls_including_empty_groups() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    for k_dim, n_dim in [(32, 16), (6, 10)]:  # grouped_mm kernel, then the unaligned fallback
        x = torch.randn(int(counts.sum()), k_dim)
        w = torch.randn(4, k_dim, n_dim)
        expected = torch.cat([p @ w[g] for g, p in enumerate(x.split(counts.tolist()))])
        torch.testing.assert_close(grouped_matmul(x, w, counts), expected)


# ------------------------------------------------------------------------------------------- no loop over tokens


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_op_count_does_not_grow_with_tokens(impl: str) -> None:
    moe = make_moe(32, 64, 4, 2, impl)
    counts = []
    for tokens in (64, 512):
        x = torch.randn(tokens, 32, requires_grad=True)
        for counter in (_OpCounter(), _OpCounter()):  # count the second call: the first may set up buffers
            with counter:
                out, stats = moe(x)
                torch.autograd.grad(out, [x, *moe.parameters()], torch.randn_like(out))
        assert (stats.tokens_per_expert > 0).all()  # same number of active experts at both sizes
        counts.append(counter.counts)
    assert counts[0] == counts[1]
    matmuls = sum(n for op, n in counts[0].items() if "mm" in op)
    assert matmuls <= 9 * 4 + 6  # at most three projections x (forward + two backward) per expert, plus the router


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_in_experts_with_the_plain_call_still_work(impl: str) -> None:
    # Expert parallelism swaps `moe.experts` for a module called as experts(rows, counts) without gates; the MoE
    # then applies the gates itself.
    class PlainCall(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return self.inner(rows, counts)

    moe, x = uneven_moe(32, 64, 2, "swiglu", True, impl)
    x.requires_grad_(True)
    out, _ = moe(x)
    (g_x,) = grads(out, torch.ones_like(out), [x])
    moe.experts = PlainCall(moe.experts)
    out_plain, _ = moe(x)
    torch.testing.assert_close(out_plain, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads(out_plain, torch.ones_like(out), [x])[0], g_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens_and_padding(impl: str) -> None:
    moe = make_moe(32, 64, 4, 2, impl)
    x = torch.randn(0, 32, requires_grad=True)
    out, stats = moe(x)
    out.sum().backward()
    assert out.shape == (0, 32) and stats.tokens_per_expert.sum() == 0
    # Padding (valid=False) is neither routed nor counted, and gets a zero output.
    x = torch.randn(2, 5, 32)
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    out, stats = moe(x, valid)
    assert int(stats.tokens_per_expert.sum()) == 8 * 2
    assert torch.equal(out[0, :2], torch.zeros(2, 32))
    torch.testing.assert_close(out[valid], reference_moe(moe, x[valid]), rtol=1e-5, atol=1e-5)


def test_recycled_gradient_buffers_never_overwrite_live_gradients() -> None:
    # The loop kernel writes expert weight gradients into memory recycled from earlier steps; it may only do so
    # once nobody holds that memory.
    moe, x = uneven_moe(32, 64, 2, "swiglu", False, "loop")
    w = moe.experts.w_up
    ups = [torch.randn(40, 32) for _ in range(3)]
    expected = [torch.autograd.grad(moe(x)[0], w, up)[0].clone() for up in ups]

    # Accumulation over micro-batches: .grad stays alive, so the second backward must not write into it.
    moe.zero_grad(set_to_none=True)
    moe(x)[0].backward(ups[0])
    moe(x)[0].backward(ups[1])
    torch.testing.assert_close(w.grad, expected[0] + expected[1], rtol=1e-5, atol=1e-6)

    # After zero_grad(set_to_none) the memory is recycled (same storage: the page faults are saved) ...
    moe.zero_grad(set_to_none=True)
    moe(x)[0].backward(ups[0])
    first = w.grad.data_ptr()
    moe.zero_grad(set_to_none=True)
    moe(x)[0].backward(ups[1])
    assert w.grad.data_ptr() == first
    torch.testing.assert_close(w.grad, expected[1], rtol=1e-5, atol=1e-6)
    # ... but not while anything, even a view, still refers to it.
    kept = w.grad.view(-1)
    moe.zero_grad(set_to_none=True)
    moe(x)[0].backward(ups[2])
    assert w.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept.view_as(w), expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, expected[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_experts_split_over_threads_equal_the_serial_loop_bitwise(kind: str, autocast: bool) -> None:
    """The loop kernel may run groups of experts on several threads at once (moe.EXPERT_THREADS / intra-op threads):
    every expert writes only its own rows and gradient slices, and each GEMM runs single-threaded, so outputs and
    gradients are bitwise those of the serial loop on one thread."""
    import sparselm.model.moe as moe_module

    counts = torch.tensor([0, 30, 2, 0, 0, 9, 51, 1, 0, 17, 40, 0])  # uneven, with empty experts

    def run(threads: int) -> list[torch.Tensor]:
        moe_module.EXPERT_THREADS = threads
        experts = make_moe(32, 48, len(counts), 1, "loop", kind=kind, bias=kind == "gelu").experts
        gen = torch.Generator().manual_seed(1)
        rows = torch.randn(int(counts.sum()), 32, generator=gen, requires_grad=True)
        gates = torch.rand(int(counts.sum()), generator=gen, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = experts(rows, counts, gates)
        out.float().square().sum().backward()
        return [out.detach(), rows.grad, gates.grad, *(p.grad for p in experts.parameters())]

    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run(1)
        torch.set_num_threads(2)
        for threads in (2, 3):
            moe_module._POOL = None
            for a, b in zip(serial, run(threads), strict=True):
                assert torch.equal(a, b)
            assert moe_module._POOL is not None and len(moe_module._POOL._threads) == threads - 1  # really split
    finally:
        moe_module.EXPERT_THREADS = 0
        torch.set_num_threads(intra)


def test_expert_groups_cover_every_expert_once_and_balance_cost() -> None:
    from sparselm.model.moe import _expert_groups

    counts = [5, 0, 3, 100, 2, 0, 7, 60, 60]
    groups = _expert_groups(counts, 2)
    flat = [item for g in groups for item in g]
    assert [e for e, _ in flat] == [e for e, n in enumerate(counts) if n]  # contiguous, in order, no empty expert
    assert all(r.stop - r.start == counts[e] for e, r in flat) and flat[-1][1].stop == sum(counts)
    cost = [sum(counts[e] + 32 for e, _ in g) for g in groups]
    assert len(groups) == 2 and max(cost) / min(cost) < 1.5
    assert _expert_groups([0, 0], 2) == [] and len(_expert_groups([4], 3)) == 1


def test_expert_threads_from_the_environment() -> None:
    code = "import sparselm.model.moe as m; print(m.EXPERT_THREADS)"
    ok = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SPARSELM_EXPERT_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert ok.stdout.strip() == "1"
    bad = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SPARSELM_EXPERT_THREADS": "two"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "SPARSELM_EXPERT_THREADS must be a non-negative integer, got 'two'" in bad.stderr


def test_experts_split_over_threads_under_inference_mode() -> None:
    """Inference mode is per thread; the worker threads must run under it too (generation uses it)."""
    import sparselm.model.moe as moe_module

    moe = make_moe(32, 48, 16, 2, "loop")
    x = torch.randn(200, 32)
    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        moe_module.EXPERT_THREADS = 1
        with torch.inference_mode():
            serial, _ = moe(x)
        torch.set_num_threads(2)
        moe_module.EXPERT_THREADS = 2
        with torch.inference_mode():
            split, _ = moe(x)
    finally:
        moe_module.EXPERT_THREADS = 0
        torch.set_num_threads(intra)
    assert torch.equal(serial, split)


def test_experts_split_only_when_they_are_small() -> None:
    """Unset EXPERT_THREADS splits small experts over the intra-op threads and leaves big ones to their own GEMMs."""
    import sparselm.model.moe as moe_module

    seen: list[str] = []

    def work(e: int, r: slice) -> None:
        import threading

        seen.append(threading.current_thread().name)

    intra = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        moe_module.EXPERT_THREADS = 0
        moe_module._run_experts(work, [1500, 0, 1600, 1400])  # >= SPLIT_BELOW_ROWS rows per busy expert
        assert len(seen) == 3 and all(not name.startswith("sparselm-experts") for name in seen)
        seen.clear()
        moe_module._run_experts(work, [100, 0, 120, 90, 110])
        assert len(seen) == 4 and any(name.startswith("sparselm-experts") for name in seen)
    finally:
        torch.set_num_threads(intra)


def test_fresh_worker_threads_compute_single_threaded() -> None:
    """A pool thread starts with OpenMP's default thread count, not the caller's: unless it sets its own, its
    GEMMs fan out over every core and the split differs from the serial loop in the last bit. A fresh process, so
    that the pool's threads are new (within this session earlier tests may have created them)."""
    script = """
import sys, torch
sys.path.insert(0, "tests")
import sparselm.model.moe as moe_module
from test_moe import make_moe
moe = make_moe(32, 48, 16, 2, "loop")
x = torch.randn(200, 32)
out = []
for expert_threads, intra in ((1, 1), (2, 2)):
    torch.set_num_threads(intra)
    moe_module.EXPERT_THREADS = expert_threads
    with torch.inference_mode():
        out.append(moe(x)[0])
sys.exit(0 if torch.equal(*out) else 1)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0
