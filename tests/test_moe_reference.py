"""The MoE layer against a per-token reference written from the papers' definitions, in float64.

The reference shares nothing with the layer under test (no Router, no dispatch or combine, no expert kernel): for
every token it computes the softmax over ``x W_r^T``, takes the top-k, renormalises the gates when asked (GShard /
Mixtral), keeps the raw probabilities (Switch) or, for a straight-through top-1 gate, takes the value 1 with the
probability's gradient, and sums the gated SwiGLU experts. The Switch load-balancing loss and the ST-MoE z-loss are
written out too, so the router's gradient through the gate and through both auxiliary losses is checked, not only
the experts'. Top-1 losing to dense in training (docs/moe-recipes.md) made this the first thing to rule out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselm.config import MoEConfig
from sparselm.model.moe import MoE

IMPLS = ["loop", "grouped_mm"]


def reference_layer(params: dict[str, torch.Tensor], x: torch.Tensor, top_k: int, gate: str):
    """Per-token MoE forward: (output [T, d], load-balancing loss, z-loss). ``gate``: "renormalize", "probability"
    or "straight_through"."""
    w_r, w_up, w_gate, w_down = params["router"], params["w_up"], params["w_gate"], params["w_down"]
    num_experts = w_r.shape[0]
    outputs, probs_all, chosen = [], [], []
    for t in range(x.shape[0]):
        logits = w_r @ x[t]
        probs = torch.softmax(logits, dim=0)
        top = torch.topk(probs, top_k).indices
        gates = probs[top]
        if gate == "renormalize":
            gates = gates / gates.sum()
        elif gate == "straight_through":
            gates = gates + (1 - gates).detach()
        y = torch.zeros_like(x[t])
        for g, e in zip(gates, top.tolist(), strict=True):
            hidden = F.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])
            y = y + g * (hidden @ w_down[e])
        outputs.append(y)
        probs_all.append(probs)
        chosen.extend(top.tolist())
    probs_all = torch.stack(probs_all)
    routed_fraction = torch.bincount(torch.tensor(chosen), minlength=num_experts).to(x.dtype) / len(chosen)
    aux = num_experts * (routed_fraction * probs_all.mean(0)).sum()
    z = torch.stack([torch.logsumexp(w_r @ x[t], 0) ** 2 for t in range(x.shape[0])]).mean()
    return torch.stack(outputs), aux, z


def layer_params(moe: MoE) -> dict[str, torch.Tensor]:
    ex = moe.experts
    return {"router": moe.router.weight, "w_up": ex.w_up, "w_gate": ex.w_gate, "w_down": ex.w_down}


def make_layer(top_k: int, gate: str, impl: str, num_experts: int = 6, d: int = 16, f: int = 24) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, router_init_std=0.5, renormalize=gate == "renormalize")
    if gate == "straight_through":
        cfg.top1_gate = "straight_through"
    moe = MoE(d, f, cfg)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(std=0.3)
    moe.experts.impl = impl
    return moe.train()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("top_k", "gate"), [(1, "probability"), (1, "straight_through"), (2, "renormalize"), (2, "probability")]
)
def test_output_losses_and_every_gradient_match_the_per_token_reference(top_k: int, gate: str, impl: str):
    moe = make_layer(top_k, gate, impl)
    torch.manual_seed(1)
    x = torch.randn(40, 16, requires_grad=True)
    upstream = torch.randn(40, 16)
    aux_coef, z_coef = 0.3, 0.05  # large, so their share of the router gradient is visible

    out, stats = moe(x)
    objective = (out * upstream).sum() + aux_coef * stats.aux_loss + z_coef * stats.z_loss
    params = layer_params(moe)
    got = torch.autograd.grad(objective, [x, *params.values()])

    x64 = x.detach().double().requires_grad_(True)
    params64 = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    ref, ref_aux, ref_z = reference_layer(params64, x64, top_k, gate)
    ref_objective = (ref * upstream.double()).sum() + aux_coef * ref_aux + z_coef * ref_z
    want = torch.autograd.grad(ref_objective, [x64, *params64.values()])

    counts = stats.tokens_per_expert.tolist()
    assert sum(counts) == 40 * top_k and max(counts) > min(counts), counts  # a real, uneven routing
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.aux_loss.double(), ref_aux, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.z_loss.double(), ref_z, rtol=1e-6, atol=1e-6)
    for name, g, w in zip(["x", *params], got, want, strict=True):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gate", ["probability", "straight_through"])
def test_top1_router_gradient_comes_through_the_gate_alone_when_losses_are_off(gate: str):
    """Top-1: the gate is the only path from the language-model loss to the router, whether its value is the raw
    probability (Switch) or 1 (straight-through). The reference's router gradient equals the layer's and is not zero."""
    moe = make_layer(1, gate, "loop")
    x = torch.randn(32, 16)
    upstream = torch.randn(32, 16)
    out, _ = moe(x)
    (got,) = torch.autograd.grad((out * upstream).sum(), [moe.router.weight])
    params64 = {k: v.detach().double().requires_grad_(True) for k, v in layer_params(moe).items()}
    ref, _, _ = reference_layer(params64, x.double(), 1, gate)
    (want,) = torch.autograd.grad((ref * upstream.double()).sum(), [params64["router"]])
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_bf16_autocast_stays_within_bf16_error_of_the_reference(top_k: int):
    gate = "renormalize" if top_k > 1 else "probability"
    moe = make_layer(top_k, gate, "loop")
    torch.manual_seed(3)
    x = torch.randn(40, 16, requires_grad=True)
    upstream = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = moe(x)
    params = layer_params(moe)
    got = torch.autograd.grad((out.float() * upstream).sum() + stats.aux_loss, [x, *params.values()])
    x64 = x.detach().double().requires_grad_(True)
    params64 = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    ref, ref_aux, _ = reference_layer(params64, x64, top_k, gate)
    want = torch.autograd.grad((ref * upstream.double()).sum() + ref_aux, [x64, *params64.values()])
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)
    for name, g, w in zip(["x", *params], got, want, strict=True):
        # relative error of the whole tensor: bf16 keeps 8 bits of mantissa
        error = (g.double() - w).norm() / w.norm()
        assert error < 0.03, f"{name}: relative error {error:.4f}"


@pytest.mark.parametrize("layer_losses", ["mean", "sum"])
def test_model_combines_the_auxiliary_losses_of_every_moe_layer(layer_losses: str):
    """layer_losses="sum" (Switch, GShard, GLaM): a coefficient of 0.01 acts as 0.01 on every layer, however many
    there are; "mean" (the default) divides it by the number of MoE layers."""
    from sparselm.config import ModelConfig
    from sparselm.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=16)
    moe = MoEConfig(num_experts=4, top_k=1, moe_every=1, router_init_std=0.5, layer_losses=layer_losses)
    out = Transformer(cfg, moe)(torch.randint(0, 64, (2, 16)))
    assert len(out.moe_stats) == 3
    scale = 1.0 if layer_losses == "sum" else 1 / 3
    torch.testing.assert_close(out.aux_loss, scale * sum(s.aux_loss for s in out.moe_stats))
    torch.testing.assert_close(out.z_loss, scale * sum(s.z_loss for s in out.moe_stats))
    # each layer's balancing loss is at least 1 (its value under perfectly uniform routing)
    assert out.aux_loss > (2.5 if layer_losses == "sum" else 0.9)
