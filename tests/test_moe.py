"""MoE layer: capacity and dropping on hand-built routings, equivalence with the dense FFN, and agreement with a plain
per-expert reference loop (outputs and gradients) on every expert implementation.

Expert implementations (``Experts.impl``): "loop" (the CPU kernel: one fused pass per expert inside a custom
autograd Function) and "grouped_mm" (autograd through ``torch.nn.functional.grouped_mm``, the path for GPUs; it falls
back to per-expert matmuls when the dims are not 16-byte aligned, e.g. d_model 6). The kernels themselves (thread
groups, recycled gradient memory, dispatch and combine) are tested op by op in test_ops_*.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparselm.config import MoEConfig
from sparselm.model.layers import FeedForward
from sparselm.model.moe import MoE

IMPLS = ["loop", "grouped_mm"]


def make_moe(
    d: int,
    f: int,
    num_experts: int,
    top_k: int,
    impl: str,
    *,
    seed: int = 0,
    router_std: float = 1.0,
    kind: str = "swiglu",
    bias: bool = False,
    **moe_cfg,
) -> MoE:
    """An MoE with random experts (std 0.2, so outputs are O(1)) and a router sharp enough to route unevenly;
    ``moe_cfg`` are ``MoEConfig`` fields."""
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, router_init_std=router_std, **moe_cfg)
    moe = MoE(d, f, cfg, kind, bias)
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
    cfg = MoEConfig(
        num_experts=num_experts, top_k=top_k, dropless=False, capacity_factor=factor, eval_capacity_factor=2 * factor
    )
    moe = MoE(8, 16, cfg)
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
def test_drop_in_experts_that_apply_the_gates_themselves(impl: str) -> None:
    # Every experts module is called as experts(rows, counts, gates). The expert-parallel one computes ungated rows
    # and scales them once they are back on their rank; that must equal the gates folded into the kernel, router
    # gradient included.
    class GatesAfter(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, rows: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
            y = self.inner(rows, counts, None)
            return y * gates.unsqueeze(-1).to(y.dtype)

    moe, x = uneven_moe(32, 64, 2, "swiglu", True, impl)
    x.requires_grad_(True)
    out, _ = moe(x)
    g_x, g_router = grads(out, torch.ones_like(out), [x, moe.router.weight])
    moe.experts = GatesAfter(moe.experts)
    out_after, _ = moe(x)
    torch.testing.assert_close(out_after, out, rtol=1e-5, atol=1e-6)
    g_x_after, g_router_after = grads(out_after, torch.ones_like(out), [x, moe.router.weight])
    torch.testing.assert_close(g_x_after, g_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_router_after, g_router, rtol=1e-5, atol=1e-6)


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
