"""Perplexity of a checkpoint on a text file or a prepared dataset split (``sparselm ppl``).

The tokens form one stream (documents separated by end-of-document, as in training) scored in windows of
``window`` tokens that predict every token once, by the same rolling log-likelihood the WikiText task of
``sparselm eval`` uses (``Scorer.rolling_requests``): the two report the same number for the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.eval.loglik import Scorer


@dataclass
class PerplexityResult:
    tokens: int  # predicted tokens
    loss: float  # mean nats per token
    perplexity: float
    bytes: int | None = None  # UTF-8 bytes of the text, when known
    bits_per_byte: float | None = None


def stream_nll(
    scorer: Scorer, tokens: Sequence[int], window: int, max_windows: int = 0, progress: bool = True
) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) of a token stream, at most ``max_windows`` windows."""
    if len(tokens) == 0:
        raise InputError("nothing to score: the input holds no tokens")
    if max_windows:
        tokens = tokens[: max_windows * window]
    requests = scorer.rolling_requests(tokens, window=window)
    with tqdm(total=len(requests), desc="ppl", unit="window", disable=not progress) as bar:
        results = scorer.loglikelihood(requests, lambda _: bar.update(1))
    return -math.fsum(r.logprob for r in results), sum(r.tokens for r in results)


def perplexity_of_text(scorer: Scorer, path: str | Path, window: int, max_windows: int = 0) -> PerplexityResult:
    """Every document of a text/JSONL input, each followed by end-of-document, as one stream."""
    from sparselm.data.reader import iter_documents

    ids: list[int] = []
    n_bytes = 0
    for doc in iter_documents([path]):
        ids.extend(scorer.tokenizer.encode(doc.text))
        ids.append(scorer.eod_id)
        n_bytes += len(doc.text.encode("utf-8"))
    nll, count = stream_nll(scorer, ids, window, max_windows)
    scored_bytes = n_bytes * count / len(ids)  # bits per byte over the bytes of the tokens actually scored
    return PerplexityResult(count, nll / count, math.exp(nll / count), n_bytes, nll / math.log(2) / scored_bytes)


def perplexity_of_split(
    scorer: Scorer, data_dir: str | Path, split: str, window: int, max_windows: int = 0
) -> PerplexityResult:
    from sparselm.data.loader import TokenShards

    shards = TokenShards(data_dir, split)
    tokens = shards.window(0, shards.num_tokens).tolist()
    nll, count = stream_nll(scorer, tokens, window, max_windows)
    return PerplexityResult(count, nll / count, math.exp(nll / count))
