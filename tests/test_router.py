"""Router: top-k choice, gate weights, jitter, the Switch load-balancing loss and the z-loss, all against hand values.

The router weight is set by hand to the identity (d_model == num_experts), so the logits are the inputs themselves
and every expected number below can be computed with ``math`` on a few floats.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparselm.model.router import Router, load_balancing_loss, router_z_loss

LOGITS = [
    [2.0, 1.0, 0.0, -1.0],
    [0.0, 3.0, 1.0, 1.5],
    [-1.0, 0.5, 2.5, 0.0],
]


def identity_router(top_k: int, renormalize: bool = True, jitter: float = 0.0) -> Router:
    router = Router(d_model=4, num_experts=4, top_k=top_k, renormalize=renormalize, jitter=jitter)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router.eval()


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def logsumexp_row(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_choice_and_gate_weights_match_hand_computation(top_k: int, renormalize: bool) -> None:
    out = identity_router(top_k, renormalize)(torch.tensor(LOGITS))
    # Hand ranking of each row above: row 0 -> 0 then 1; row 1 -> 1 then 3; row 2 -> 2 then 1.
    expected_experts = [[0, 1], [1, 3], [2, 1]]
    for t, row in enumerate(LOGITS):
        probs = softmax_row(row)
        chosen = expected_experts[t][:top_k]
        gates = [probs[e] for e in chosen]
        # k=1 keeps the raw probability whatever `renormalize` says (Switch): renormalising a single gate would pin
        # it to 1 and cut the router off from the task gradient.
        if renormalize and top_k > 1:
            gates = [g / sum(gates) for g in gates]
        assert out.experts[t].tolist() == chosen
        torch.testing.assert_close(out.weights[t], torch.tensor(gates), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.probs[t], torch.tensor(probs), rtol=1e-6, atol=1e-7)
    assert out.weights.dtype == torch.float32 and out.experts.dtype == torch.int64
    counts = [0, 0, 0, 0]
    for row in expected_experts:
        for e in row[:top_k]:
            counts[e] += 1
    assert out.tokens_per_expert.tolist() == counts


def test_renormalised_top2_gates_sum_to_one_and_unrenormalised_do_not() -> None:
    x = torch.randn(64, 4)
    renorm = identity_router(2, renormalize=True)(x).weights.sum(-1)
    raw = identity_router(2, renormalize=False)(x).weights.sum(-1)
    torch.testing.assert_close(renorm, torch.ones(64))
    assert (raw < 1).all()


def test_jitter_only_in_training_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    plain = identity_router(2)
    jittery = identity_router(2, jitter=0.5)
    # Eval: jitter is off, so the jittery router is bit-identical to the plain one and deterministic.
    a, b = jittery(x), plain(x)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.experts, b.experts)
    assert torch.equal(jittery(x).probs, a.probs)
    # Training: the input is multiplied by noise from U(1 - 0.5, 1 + 0.5), so probabilities move and differ per call.
    jittery.train()
    c, d = jittery(x), jittery(x)
    assert not torch.allclose(c.probs, b.probs)
    assert not torch.allclose(c.probs, d.probs)
    # ... but a router with jitter 0 is unaffected by training mode.
    plain.train()
    assert torch.equal(plain(x).probs, b.probs)


def test_load_balancing_loss_by_hand() -> None:
    # 4 tokens, 2 experts, top-1: f = (3/4, 1/4), P = mean probs = (0.65, 0.35) -> E * sum f*P = 2 * 0.575 = 1.15.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    experts = torch.tensor([[0], [0], [1], [0]])
    torch.testing.assert_close(load_balancing_loss(probs, experts, 2), torch.tensor(1.15))

    # Top-2 over 3 experts: f counts the T*k = 4 assignments, so f = (2/4, 1/4, 1/4).
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]])
    experts = torch.tensor([[0, 1], [2, 0]])
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [0.45, 0.2, 0.35]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    torch.testing.assert_close(load_balancing_loss(probs, experts, 3), torch.tensor(expected))


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_load_balancing_loss_uniform_is_one_and_collapsed_is_num_experts(num_experts: int) -> None:
    tokens = 4 * num_experts
    uniform_probs = torch.full((tokens, num_experts), 1.0 / num_experts)
    round_robin = torch.arange(tokens).remainder(num_experts).unsqueeze(-1)
    torch.testing.assert_close(load_balancing_loss(uniform_probs, round_robin, num_experts), torch.tensor(1.0))

    # Every token sends all its probability and its assignment to expert 0: f_0 = P_0 = 1, loss = E.
    collapsed_probs = torch.zeros(tokens, num_experts)
    collapsed_probs[:, 0] = 1.0
    all_zero = torch.zeros(tokens, 1, dtype=torch.int64)
    loss = load_balancing_loss(collapsed_probs, all_zero, num_experts)
    torch.testing.assert_close(loss, torch.tensor(float(num_experts)))


def test_router_aux_loss_matches_hand_f_and_p() -> None:
    out = identity_router(2)(torch.tensor(LOGITS))
    # Assignments (hand ranking above): expert 0 x1, expert 1 x3, expert 2 x1, expert 3 x1 out of T*k = 6.
    f = [1 / 6, 3 / 6, 1 / 6, 1 / 6]
    probs = [softmax_row(row) for row in LOGITS]
    p = [sum(row[e] for row in probs) / len(LOGITS) for e in range(4)]
    expected = 4 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    torch.testing.assert_close(out.aux_loss, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_z_loss_is_mean_squared_logsumexp() -> None:
    expected = sum(logsumexp_row(row) ** 2 for row in LOGITS) / len(LOGITS)
    torch.testing.assert_close(router_z_loss(torch.tensor(LOGITS)), torch.tensor(expected))
    out = identity_router(2)(torch.tensor(LOGITS))
    torch.testing.assert_close(out.z_loss, torch.tensor(expected))
    # Zero logits over E experts: logsumexp = log E.
    torch.testing.assert_close(router_z_loss(torch.zeros(5, 8)), torch.tensor(math.log(8) ** 2))


def test_inference_mode_skips_the_losses_and_nothing_else() -> None:
    """Generation and serving run under torch.inference_mode, where nothing trains on the losses: they are 0 there,
    and the routing is the same as under no_grad (where they are computed, e.g. for a validation pass)."""
    router = identity_router(2)
    with torch.no_grad():
        plain = router(torch.tensor(LOGITS))
    with torch.inference_mode():
        fast = router(torch.tensor(LOGITS))
    assert plain.aux_loss > 0 and plain.z_loss > 0
    assert fast.aux_loss == 0 and fast.z_loss == 0
    for name in ("weights", "experts", "probs", "tokens_per_expert"):
        assert torch.equal(getattr(fast, name), getattr(plain, name))


def test_router_runs_in_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    router = Router(d_model=16, num_experts=8, top_k=2).eval()
    x = torch.randn(64, 16)
    reference = router(x)
    for inp in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = router(inp)
        for name in ("weights", "probs", "aux_loss", "z_loss"):
            assert getattr(out, name).dtype == torch.float32, name
        if inp.dtype == torch.float32:
            # Same fp32 input, fp32 arithmetic: autocast must not have touched anything.
            assert torch.equal(out.probs, reference.probs)
            assert torch.equal(out.experts, reference.experts)
            assert torch.equal(out.z_loss, reference.z_loss)
        else:
            # A bf16 input is upcast, then routed in fp32: same as routing the rounded input without autocast.
            assert torch.equal(out.probs, router(inp.float()).probs)


def test_router_gradients_reach_weight_from_gates_and_losses() -> None:
    router = identity_router(2).train()
    out = router(torch.tensor(LOGITS))
    (out.weights[:, 0].sum() + out.aux_loss + out.z_loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_straight_through_top1_gate_is_one_with_the_probabilitys_gradient() -> None:
    """top1_gate="straight_through": the expert's output is not scaled by a probability near 1/E, and the router gets
    the same task gradient as with Switch's probability gate."""
    x = torch.tensor(LOGITS)
    switch = identity_router(1).train()
    straight = identity_router(1).train()
    straight.top1_gate = "straight_through"
    upstream = torch.tensor([[0.3], [-1.2], [0.7]])
    raw, out = switch(x), straight(x)
    torch.testing.assert_close(out.weights, torch.ones(3, 1))
    assert (raw.weights < 1).all()
    (g_switch,) = torch.autograd.grad((raw.weights * upstream).sum(), [switch.weight])
    (g_straight,) = torch.autograd.grad((out.weights * upstream).sum(), [straight.weight])
    assert g_switch.abs().sum() > 0
    torch.testing.assert_close(g_straight, g_switch)
