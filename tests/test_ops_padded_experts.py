"""The padded expert kernel (``sparselm.ops.padded_experts``): agreement with the textbook experts and the loop kernel,
empty experts and empty inputs, bf16 results equal to the loop's, the rule choosing it, and ``Experts`` picking it
only for inference."""

from __future__ import annotations

import pytest
import torch

from expert_reference import as_args, check_against_textbook, expert_weights
from sparselm.config import MoEConfig
from sparselm.model.moe import MoE
from sparselm.ops import ExpertLoop, ExpertLoopSettings, padded_experts, prefer_padded
from sparselm.ops.padded_experts import LOOP_OVERHEAD_MACS


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("gated", [True, False])
def test_padded_experts_match_the_textbook_experts_values_and_gradients(kind: str, bias: bool, gated: bool) -> None:
    check_against_textbook(padded_experts, torch.tensor([7, 0, 12, 3, 9]), 16, 24, kind, bias, gated, seed=2)


def test_padded_experts_in_bf16_equal_the_loop_kernel_and_take_lists_and_empty_inputs() -> None:
    counts = [3, 1, 0, 4, 2, 2]
    w = {k: (v.detach().bfloat16() if v is not None else None) for k, v in expert_weights(6, 32, 48).items()}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), 32, generator=gen).bfloat16()
    gates = torch.rand(sum(counts), generator=gen)
    with torch.inference_mode():
        loop = ExpertLoop(ExpertLoopSettings(threads=1))(x, gates, torch.tensor(counts), *as_args(w))
        padded = padded_experts(x, gates, counts, *as_args(w))
        empty = padded_experts(x[:0], gates[:0], [0] * 6, *as_args(w))
    assert padded.dtype == torch.bfloat16 and torch.equal(padded, loop)
    assert empty.shape == (0, 32)


def test_prefer_padded_is_about_the_padding() -> None:
    assert prefer_padded([4, 4, 3, 5])  # every expert busy: 4 * 5 = 20 padded rows for 16
    assert not prefer_padded([1, 0, 0, 1] + [0] * 12)  # one token's top-2 of 16: 16 padded rows for 2
    assert not prefer_padded([100] + [2] * 7)  # one busy expert: 800 padded rows for 114
    assert not prefer_padded([0, 0, 0])
    assert prefer_padded([4, 1, 1, 0]) and not prefer_padded([4, 1, 1, 0], torch.float32)  # 16 padded for 6 rows


def test_large_steps_are_padded_only_while_the_waste_stays_under_the_loops_overhead() -> None:
    d512 = 512 * 704  # one row's multiply-adds in one projection of the d512 model's experts
    budget = LOOP_OVERHEAD_MACS[torch.bfloat16] * 16 // d512  # wasted rows allowed over 16 experts: 16 x 44
    prompt_chunk = [300] + [252] * 15  # 2,048 tokens' top-2: 4,080 rows, 720 of them padding
    assert prefer_padded(prompt_chunk)  # the padding factor alone (1.18x) allows it
    assert 16 * 300 - sum(prompt_chunk) > budget and not prefer_padded(prompt_chunk, row_macs=d512)
    balanced = [256 + (i % 2) for i in range(16)]  # 8 padded rows
    assert prefer_padded(balanced, row_macs=d512)
    decode = [3, 2, 2, 1, 2, 3, 2, 1, 2, 2, 3, 1, 2, 2, 3, 1]  # 16 tokens' top-2: every step of decoding qualifies
    assert prefer_padded(decode, row_macs=d512)
    waste_500 = [288] + [255] * 14 + [250]  # 4,108 rows padded to 4,608: within bf16's allowance, not fp32's
    assert 16 * 288 - sum(waste_500) == 500
    assert prefer_padded(waste_500, row_macs=d512) and not prefer_padded(waste_500, torch.float32, row_macs=d512)


def test_experts_pick_the_padded_kernel_only_for_inference_in_the_weights_dtype(monkeypatch) -> None:
    import sparselm.model.moe as moe_module

    calls = []
    for name in ("padded_experts", "grouped_experts"):
        original = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    torch.manual_seed(0)
    moe = MoE(16, 24, MoEConfig(num_experts=4, top_k=2)).eval()
    for p in moe.parameters():  # the transformer initialises them; a bare MoE holds torch.empty
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(32, 16)  # 64 assignments over 4 experts: little padding
    y_train, _ = moe(x)
    assert calls == []  # gradients on: the loop
    with torch.inference_mode():
        y_infer, _ = moe(x)
        assert calls == ["padded_experts"]
        torch.testing.assert_close(y_infer, y_train.detach(), rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 compute: the loop casts per expert
            moe(x)
        assert calls == ["padded_experts"]
        moe.experts.impl = "padded"
        moe(x[:1])
        assert calls == ["padded_experts"] * 2
        moe.experts.impl = "bogus"
        with pytest.raises(ValueError, match="'padded'"):
            moe(x)
