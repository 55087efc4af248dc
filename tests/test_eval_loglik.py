"""The scoring engine: log-likelihoods equal hand sums over the model's logits, batching/padding change nothing,
truncation keeps the continuation, rolling windows predict every token exactly once, LAMBADA needs every token."""

from __future__ import annotations

import pytest
import torch

from sparselm.config import ModelConfig, MoEConfig
from sparselm.eval.loglik import Scorer
from sparselm.model.generate import SamplingConfig, generate
from sparselm.model.transformer import Transformer

VOCAB, MAX_LEN, EOD = 40, 24, 2


class CharTokenizer:
    """One token per character (ids 3..39), so contexts and continuations of known lengths are easy to build."""

    eod_id = EOD

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % (VOCAB - 3)) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i != EOD)


@pytest.fixture(autouse=True)
def one_thread():
    # The CPU is shared: one thread avoids OpenMP contention that makes tiny forwards 50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(position: str = "rope", experts: int = 4) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=MAX_LEN)
    cfg.position = position
    return Transformer(cfg, MoEConfig(num_experts=experts, top_k=2)).eval()


def random_requests(n_questions: int, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    """Questions with 1-4 options sharing a context (sometimes empty, sometimes longer than the model)."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for q in range(n_questions):
        length = [0, 3, 30][q % 3] + int(torch.randint(0, 6, (), generator=g))
        context = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        for _ in range(1 + q % 4):
            cont_len = int(torch.randint(1, 9, (), generator=g))
            requests.append((context, torch.randint(3, VOCAB, (cont_len,), generator=g).tolist()))
    return requests


def by_hand(model: Transformer, context: list[int], continuation: list[int]) -> tuple[float, bool, int]:
    """One unpadded forward of context + continuation[:-1], log-softmax, pick the continuation tokens, sum."""
    context = context or [EOD]
    dropped = max(0, len(context) + len(continuation) - (MAX_LEN + 1))
    context = context[dropped:]
    seq = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(seq).logits[0].double(), dim=-1)
    rows = logprobs[len(context) - 1 :]
    target = torch.tensor(continuation)
    total = sum(float(rows[i, t]) for i, t in enumerate(continuation))
    return total, bool((rows.argmax(-1) == target).all()), dropped


@pytest.mark.parametrize("position", ["rope", "relative", "xl", "absolute"])
def test_loglikelihood_equals_hand_sum_and_batching_changes_nothing(position: str) -> None:
    model = tiny_model(position)
    requests = random_requests(9)
    batched = Scorer(model, CharTokenizer(), batch_size=5).loglikelihood(requests)
    alone = Scorer(model, CharTokenizer(), batch_size=1).loglikelihood(requests)
    for (context, continuation), b, a in zip(requests, batched, alone, strict=True):
        total, greedy, dropped = by_hand(model, context, continuation)
        assert b.logprob == pytest.approx(total, abs=1e-4)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert b.is_greedy == a.is_greedy == greedy
        assert b.truncated == a.truncated == dropped
        assert b.tokens == len(continuation) and b.ok
    assert any(r.truncated for r in batched)  # the 30+ token contexts were cut on the left


def test_dense_model_and_bf16_run() -> None:
    model = tiny_model(experts=0)
    requests = random_requests(4)
    fp32 = Scorer(model, CharTokenizer()).loglikelihood(requests)
    bf16 = Scorer(model, CharTokenizer(), precision="bf16").loglikelihood(requests)
    for (context, continuation), r, h in zip(requests, fp32, bf16, strict=True):
        assert r.logprob == pytest.approx(by_hand(model, context, continuation)[0], abs=1e-4)
        assert h.logprob == pytest.approx(r.logprob, rel=0.05, abs=0.2)  # bf16 keeps ~3 significant digits


def test_too_long_continuation_is_flagged_not_scored() -> None:
    result = Scorer(tiny_model(), CharTokenizer()).loglikelihood([([5, 6], list(range(3, 3 + MAX_LEN + 1)))])[0]
    assert not result.ok
    with pytest.raises(ValueError, match="no tokens"):
        Scorer(tiny_model(), CharTokenizer()).loglikelihood([([5], [])])


def test_encode_pair_moves_trailing_space_and_handles_empty_context() -> None:
    scorer = Scorer(tiny_model(), CharTokenizer())
    tok = CharTokenizer()
    assert scorer.encode_pair("ab ", "c") == (tok.encode("ab"), tok.encode(" c"))
    assert scorer.encode_pair("", "xy") == ([EOD], tok.encode("xy"))
    # Text requests give the same scores as the token requests they encode to.
    text = scorer.loglikelihood_text([("hello there", " friend")])[0]
    ids = scorer.loglikelihood([(tok.encode("hello there"), tok.encode(" friend"))])[0]
    assert text.logprob == pytest.approx(ids.logprob, abs=1e-6)


@pytest.mark.parametrize("stride", [0, 10, 1])
def test_rolling_windows_predict_every_token_once(stride: int) -> None:
    model = tiny_model()
    scorer = Scorer(model, CharTokenizer(), batch_size=4)
    tokens = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    windows = scorer.rolling_requests(tokens, stride)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens
    for context, cont in windows:
        assert len(context) >= 1 and len(context) + len(cont) - 1 <= MAX_LEN
    if stride == 0:  # disjoint windows of max_seq_len predictions, the last one filled up with earlier context
        assert [len(c) for _, c in windows] == [24, 24, 22]
        assert len(windows[-1][0]) + len(windows[-1][1]) - 1 == MAX_LEN
    # A text that fits in one window: the rolling score is one plain forward of [eod] + text.
    short = tokens[:20]
    total, count = scorer.rolling([CharTokenizer().decode(short)], stride)[0]
    hand, _, _ = by_hand(model, [EOD], CharTokenizer().encode(CharTokenizer().decode(short)))
    assert count == 20 and total == pytest.approx(hand, abs=1e-4)
    # Smaller strides give every prediction more context, so the sum changes, but the token count never does.
    assert scorer.rolling([CharTokenizer().decode(tokens)], stride)[0][1] == 70


def test_last_word_accuracy_needs_every_token_greedy() -> None:
    """LAMBADA: a multi-token word counts only if greedy decoding reproduces all of its tokens."""
    model = tiny_model()
    context = [5, 9, 11, 7, 20, 13]
    greedy = generate(model, [context], SamplingConfig(max_new_tokens=3, greedy=True, stop_on_eod=False))[0]
    scorer = Scorer(model, CharTokenizer())
    exact, first_only, last_wrong = scorer.loglikelihood(
        [
            (context, greedy),
            (context, greedy[:1] + [3 + (greedy[1] - 2) % (VOCAB - 3)] + greedy[2:]),
            (context, greedy[:2] + [3 + (greedy[2] - 2) % (VOCAB - 3)]),
        ]
    )
    assert exact.is_greedy
    assert not first_only.is_greedy and not last_wrong.is_greedy


def test_generate_until_cuts_at_stop_strings() -> None:
    model = tiny_model()
    scorer = Scorer(model, CharTokenizer(), batch_size=2)
    prompts = ["abc", "hello world", "x"]
    free = scorer.generate_until(prompts, [], 8)
    assert [len(text) for text, _ in free] == [8, 8, 8]  # one character per token here
    stops = [text[3] for text, _ in free]
    cut = scorer.generate_until(prompts, stops, 8)
    # Every prompt is cut before the first occurrence of any stop string (each prompt's 4th character is one).
    expected = [text[: min(text.find(s) for s in stops if s in text)] for text, _ in free]
    assert [c for c, _ in cut] == expected and all(len(c) <= 3 for c in expected)
    # Alone or batched with other prompts: the same greedy text.
    assert Scorer(model, CharTokenizer(), batch_size=1).generate_until(prompts, [], 8) == free
    # Prompts longer than the room left are cut on the left (and counted).
    ((_, dropped),) = scorer.generate_until(["q" * 40], [], 4)
    assert dropped == 40 - (MAX_LEN - 4)
