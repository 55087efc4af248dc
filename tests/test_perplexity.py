"""`sparselm ppl` is the WikiText task's rolling log-likelihood over one token stream: every token predicted once,
each window's loss equal to a plain forward over it, the same numbers from the CLI, errors in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparselm.cli import main
from sparselm.config import ModelConfig, MoEConfig
from sparselm.errors import InputError
from sparselm.eval.loglik import Scorer
from sparselm.eval.perplexity import stream_nll
from sparselm.model.transformer import Transformer
from tiny_run import SMALLEST_RUN, tiny_config

VOCAB, MAX_LEN, EOD = 40, 24, 2


class DigitTokenizer:
    eod_id = EOD

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % (VOCAB - 3)) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i != EOD)


def plain_nll(model: Transformer, tokens: list[int], window: int) -> tuple[float, int]:
    """Disjoint windows over [eod] + tokens by hand: each window a plain forward, its last ``window`` targets summed
    (the first window has no earlier context; later ones see one token of context, their first target's input)."""
    seq = [EOD, *tokens]
    total, count, start = 0.0, 0, 1
    while start < len(seq):
        end = min(start + window, len(seq))
        inputs = seq[max(0, end - 1 - window) : end - 1]
        targets = seq[start:end]
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0, -len(targets) :]
        total -= F.log_softmax(logits.double(), -1).gather(1, torch.tensor(targets).unsqueeze(1)).sum().item()
        count += len(targets)
        start = end
    return total, count


@pytest.mark.parametrize("window", [24, 7])
def test_stream_nll_is_a_plain_forward_per_window(window: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=MAX_LEN)
    model = Transformer(cfg, MoEConfig(num_experts=4, top_k=2)).eval()
    tokens = torch.randint(3, VOCAB, (101,), generator=torch.Generator().manual_seed(1)).tolist()
    scorer = Scorer(model, DigitTokenizer(), batch_size=3)
    nll, count = stream_nll(scorer, tokens, window, progress=False)
    expected, expected_count = plain_nll(model, tokens, window)
    assert count == expected_count == len(tokens)  # every token predicted exactly once
    assert nll == pytest.approx(expected, rel=1e-5)
    few, few_count = stream_nll(scorer, tokens, window, max_windows=2, progress=False)
    assert few_count == 2 * window and few < nll


def test_empty_stream_and_bad_window_are_refused() -> None:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=MAX_LEN)
    scorer = Scorer(Transformer(cfg).eval(), DigitTokenizer())
    with pytest.raises(InputError, match="no tokens"):
        stream_nll(scorer, [], 8, progress=False)
    with pytest.raises(InputError, match=r"window must be in \[1, max_seq_len=24\], got 25"):
        stream_nll(scorer, [3, 4], 25, progress=False)


@pytest.mark.slow
def test_ppl_cli_on_a_split_and_on_text(
    tiny_dataset: Path, tiny_vocab_size: int, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from sparselm.train.trainer import train

    cfg = tiny_config(tiny_dataset, tiny_vocab_size, *SMALLEST_RUN)
    train(cfg, tmp_path / "run")
    capsys.readouterr()
    assert main(["ppl", "--ckpt", str(tmp_path / "run"), "--input", str(tiny_dataset), "--json"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert split["perplexity"] == pytest.approx(math.exp(split["loss"]))
    assert 1.0 < split["perplexity"] < tiny_vocab_size * 2  # barely trained: near uniform
    text = tmp_path / "held_out.txt"
    text.write_text("It was the best of times, it was the worst of times.\n")
    assert main(["ppl", "--ckpt", str(tmp_path / "run"), "--input", str(text), "--json", "--seq-len", "16"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["bits_per_byte"] > 0 and scored["tokens"] > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["ppl", "--ckpt", str(tmp_path / "run"), "--input", str(empty)]) == 2
    assert "nothing to score" in capsys.readouterr().err
