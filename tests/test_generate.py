"""Generation: the KV-cache path must reproduce full recomputation exactly, for every position kind and FFN kind."""

from __future__ import annotations

import copy

import pytest
import torch

from sparselm.config import ModelConfig, MoEConfig
from sparselm.model.generate import SamplingConfig, generate, generate_text, left_pad, sample_next
from sparselm.model.transformer import Transformer

POSITIONS = ["rope", "relative", "xl", "absolute", "none"]
FFNS = {
    "dense": MoEConfig(),
    "moe": MoEConfig(num_experts=4, top_k=2, moe_every=1),
    # capacity_factor 1.0 would drop in training mode; eval_capacity_factor 4.0 >= num_experts / top_k means an
    # expert can always take every token, so eval (generation) drops nothing and batching cannot change results.
    "moe_capacity": MoEConfig(num_experts=4, top_k=2, moe_every=1, dropless=False, eval_capacity_factor=4.0),
}
# Different lengths on purpose: the batched path left-pads the shorter ones.
PROMPTS = [[3, 14, 15, 9, 26, 5, 35], [8, 9], [27, 18, 28, 18]]
GREEDY = SamplingConfig(max_new_tokens=10, greedy=True)


def make_model(position: str = "rope", ffn: str = "dense", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # init_std 0.5 (vs 0.02 for training) spreads the logits of a random model, so greedy choices are never near
    # ties that float noise between the cached and the recomputed path could flip.
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, position=position, init_std=0.5
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return Transformer(cfg, copy.deepcopy(FFNS[ffn]))


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], n: int, eod_id: int | None = None) -> list[int]:
    """Argmax of the full-sequence forward at every step: no cache, no padding, no last_only."""
    model.eval()
    seq, out = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        if token == eod_id:
            break
        out.append(token)
        seq.append(token)
    return out


@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("position", POSITIONS)
def test_cached_batch_matches_full_recompute(position: str, ffn: str) -> None:
    model = make_model(position, ffn)
    cached = generate(model, PROMPTS, GREEDY)
    expected = [reference_greedy(model, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert cached == expected
    assert generate(model, PROMPTS, GREEDY, use_cache=False) == expected
    assert [generate(model, [p], GREEDY)[0] for p in PROMPTS] == expected  # batch of one, no padding
    assert len({t for out in expected for t in out}) > 5  # the model is not stuck on one token: a meaningful test


@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("position", POSITIONS)
@torch.no_grad()
def test_cached_logits_match_full_recompute(position: str, ffn: str) -> None:
    model = make_model(position, ffn).eval()
    idx, positions, valid = left_pad(PROMPTS)
    cache = model.new_cache(len(PROMPTS), idx.shape[1] + 8)
    prefill = model(idx, positions=positions, valid=valid, cache=cache).logits
    seqs = [list(p) for p in PROMPTS]
    for row, seq in enumerate(seqs):  # every real prefill position, not only the last
        full = model(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(prefill[row, -len(seq) :], full, atol=1e-4, rtol=0)
    logits = prefill[:, -1]
    next_pos = torch.tensor([len(p) for p in PROMPTS])
    for _ in range(8):
        tokens = logits.argmax(-1)
        for seq, token in zip(seqs, tokens.tolist(), strict=True):
            seq.append(token)
        logits = model(tokens[:, None], positions=next_pos[:, None], cache=cache, last_only=True).logits[:, -1]
        next_pos += 1
        full = torch.stack([model(torch.tensor([seq])).logits[0, -1] for seq in seqs])
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_matches_uncached() -> None:
    model = make_model("rope", "moe")
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.5, seed=7)
    first = generate(model, PROMPTS, cfg)
    assert generate(model, PROMPTS, cfg) == first
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.5, seed=8)) != first
    # Both paths give sample_next one [B, V] row per prompt per step, so they consume the generator identically.
    assert generate(model, PROMPTS, cfg, use_cache=False) == first
    assert all(len(out) == 12 for out in first)


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    model = make_model("relative", "dense")
    greedy = generate(model, PROMPTS, GREEDY)
    for seed in (0, 1):
        top1 = SamplingConfig(max_new_tokens=10, temperature=2.0, top_k=1, seed=seed)
        nucleus = SamplingConfig(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=seed)
        assert generate(model, PROMPTS, top1) == greedy
        assert generate(model, PROMPTS, nucleus) == greedy
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.0)) == greedy


def test_sample_next_filters() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    # top_p 0.7: mass before token 3 is 0.5 < 0.7 (kept), before token 2 it is 0.8 (dropped).
    picked = sample_next(logits, SamplingConfig(top_p=0.7), gen)
    assert set(picked.tolist()) == {1, 3}
    picked = sample_next(logits, SamplingConfig(top_k=3), gen)
    assert set(picked.tolist()) == {1, 2, 3}
    picked = sample_next(logits, SamplingConfig(), gen)
    assert set(picked.tolist()) == {0, 1, 2, 3}
    assert abs((picked == 1).float().mean().item() - 0.5) < 0.05
    assert sample_next(logits[:2], SamplingConfig(greedy=True)).tolist() == [1, 1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", -1),
        ("max_new_tokens", 2.5),
        ("greedy", "yes"),
    ],
)
def test_sampling_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})
    cfg = SamplingConfig()
    setattr(cfg, field, value)  # mutated after construction: generate validates again
    with pytest.raises(ValueError, match=field):
        generate(make_model(), PROMPTS, cfg)


def test_stops_at_eod_per_sequence() -> None:
    model = make_model("xl", "moe")
    free = generate(model, PROMPTS, GREEDY)
    eod = free[0][3]
    got = generate(model, PROMPTS, GREEDY, eod_id=eod)
    # Each row stops at its own first eod, which is not part of the output; rows without eod run to the end.
    expected = [out[: out.index(eod)] if eod in out else out for out in free]
    assert got == expected
    assert got[0] == free[0][:3]
    assert got == [reference_greedy(model, p, GREEDY.max_new_tokens, eod_id=eod) for p in PROMPTS]
    assert generate(model, PROMPTS, GREEDY, eod_id=eod, use_cache=False) == expected
    no_stop = SamplingConfig(max_new_tokens=10, greedy=True, stop_on_eod=False)
    assert generate(model, PROMPTS, no_stop, eod_id=eod) == free


def test_forced_eod_stops_everything_after_prefill() -> None:
    model = make_model("rope", "dense", tie_embeddings=False)
    eod = 5
    boost = torch.zeros(64)
    boost[eod] = 100.0
    model.lm_head.register_forward_hook(lambda _module, _inputs, out: out + boost)  # acts as an lm-head bias
    calls = []
    model.register_forward_pre_hook(lambda _module, _inputs: calls.append(1))
    sampled = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3)
    assert generate(model, PROMPTS, sampled, eod_id=eod) == [[], [], []]
    assert len(calls) == 1  # every row finished on the prefill logits: no decode step ran
    assert generate(model, PROMPTS, GREEDY, eod_id=None) == [[eod] * 10] * 3  # no eod id: nothing to stop on


def test_max_seq_len_caps_new_tokens() -> None:
    model = make_model("absolute", "moe")  # absolute embeddings would fail loudly on a position >= max_seq_len
    long_prompt = [(7 * i) % 64 for i in range(60)]
    prompts = [long_prompt, [1, 2]]
    got = generate(model, prompts, GREEDY)
    assert [len(out) for out in got] == [4, 10]  # 60 + 4 = max_seq_len; the short row keeps going
    assert got == [reference_greedy(model, long_prompt, 4), reference_greedy(model, [1, 2], 10)]
    assert generate(model, prompts, GREEDY, use_cache=False) == got
    for length in (64, 70):
        with pytest.raises(ValueError, match="max_seq_len"):
            generate(model, [[1] * length], GREEDY)


def test_prompt_validation() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], GREEDY)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, 64]], GREEDY)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], GREEDY)
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=0)) == [[], [], []]


def test_restores_training_mode() -> None:
    model = make_model("rope", "moe_capacity")
    model.train()
    generate(model, PROMPTS, GREEDY)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    generate(model, PROMPTS, GREEDY)
    assert not model.training


@pytest.mark.parametrize("position", ["rope", "xl"])
def test_bf16_autocast(position: str) -> None:
    model = make_model(position, "moe")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, top_k=8, top_p=0.9))
        greedy = generate(model, PROMPTS, GREEDY)
    for out in (*got, *greedy):
        assert all(0 <= t < 64 for t in out)
    assert [len(out) for out in got] == [6, 6, 6]
    assert [len(out) for out in greedy] == [10, 10, 10]


class CharTokenizer:
    """Stand-in for the project tokenizer: one token per character, id 0 is end-of-document."""

    eod_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 63 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("!") + i) for i in ids)


def test_generate_text() -> None:
    model = make_model("none", "dense")
    tok = CharTokenizer()
    texts = generate_text(model, tok, ["hello", "a", ""], GREEDY)
    ids = generate(model, [tok.encode("hello"), tok.encode("a"), [tok.eod_id]], GREEDY, eod_id=tok.eod_id)
    assert texts == [tok.decode(out) for out in ids]


def test_padding_takes_no_capacity_from_real_tokens() -> None:
    """Capacity-mode MoE in a left-padded batch: pads are not routed, so real tokens see exactly the unpadded result."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, init_std=0.5)
    model = Transformer(cfg, MoEConfig(num_experts=8, top_k=1, moe_every=1, dropless=False, eval_capacity_factor=2.0))
    model.eval()
    # One prompt behind 16 pads (capacity depends on the batch's real tokens, so compare a batch of one).
    idx = torch.tensor([[0] * 16 + [5, 6, 7]])
    valid = idx != 0
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(idx, positions=positions, valid=valid)
        alone = model(torch.tensor([[5, 6, 7]]))
    torch.testing.assert_close(padded.logits[0, -3:], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert [int(s.tokens_per_expert.sum()) for s in padded.moe_stats] == [3, 3]  # pads were never routed
