"""Metrics computed the way published numbers are: lm-evaluation-harness conventions, SQuAD answer normalisation.

Every function here is pure Python over plain numbers and strings, so each can be checked by hand on tiny inputs.

- Multiple choice: ``acc`` picks the option with the highest summed log-likelihood; ``acc_norm`` divides each
  option's log-likelihood by the number of characters of the option text (without the target delimiter), as
  lm-eval's ``acc_norm`` does.
- Standard errors of means use the sample standard deviation (n - 1), as lm-eval's ``mean_stderr``.
- Generation: Exact Match and token F1 after SQuAD v1.1 normalisation (lower case, no punctuation, no articles,
  single spaces), the best over every reference alias.
- Perplexity: token-, word- and byte-level; words are counted as lm-eval does for WikiText
  (``len(re.split(r"\\s+", text))`` on the original text, before any detokenisation).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from sparselm.errors import InputError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); no standard error for n < 2."""
    n = len(values)
    if n == 0:
        raise InputError("mean of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy.argmax, which lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(prediction by summed log-likelihood, prediction by log-likelihood per character of the choice text)."""
    if len(logprobs) != len(choices) or not choices:
        raise InputError(f"{len(logprobs)} scores for {len(choices)} choices")
    # An empty choice would divide by zero; lm-eval would produce inf/nan there. Count it as one character.
    per_char = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    return argmax(logprobs), argmax(per_char)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer."""
    if not answers:
        raise InputError("exact_match needs at least one reference answer")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    if not prediction_tokens or not answer_tokens:
        # SQuAD 2.0 convention: two empty answers agree, an empty one against a non-empty one scores zero.
        return float(prediction_tokens == answer_tokens)
    common = Counter(prediction_tokens) & Counter(answer_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 of the normalised prediction against any normalised reference answer."""
    if not answers:
        raise InputError("token_f1 needs at least one reference answer")
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in answers)


def count_words(text: str) -> int:
    """Word count used for word-level perplexity: lm-eval's ``len(re.split(r"\\s+", text))`` (note that leading or
    trailing whitespace adds an empty "word", exactly as in the published lm-eval WikiText numbers)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def corpus_perplexities(logprob_sum: float, tokens: int, words: int, n_bytes: int) -> dict[str, float]:
    """Token/word/byte perplexity and bits per byte of a corpus, from its summed log-likelihood (nats).

    Each is the total negative log-likelihood divided by a different count, so the numbers are comparable across
    tokenizers only at the word and byte level.
    """
    if tokens <= 0 or words <= 0 or n_bytes <= 0:
        raise InputError(f"perplexity needs positive counts, got tokens={tokens} words={words} bytes={n_bytes}")
    nll = -logprob_sum
    return {
        "token_perplexity": _safe_exp(nll / tokens),
        "word_perplexity": _safe_exp(nll / words),
        "byte_perplexity": _safe_exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
    }


def example_perplexity(logprobs: Sequence[float]) -> tuple[float, float | None]:
    """lm-eval's per-example perplexity (LAMBADA): exp(-mean log-likelihood), with a delta-method standard error
    (ppl * stderr of the mean log-likelihood; lm-eval bootstraps instead, which gives nearly the same number)."""
    mean, stderr = mean_stderr(logprobs)
    ppl = _safe_exp(-mean)
    return ppl, (ppl * stderr if stderr is not None else None)


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
