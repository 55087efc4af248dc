"""Per-sequence token choice and logprobs for a step's rows of logits.

Each sequence samples with its own settings and its own seeded generator through ``sample_next``, the one sampler
of ``sparselm generate``; greedy rows are decided together with one argmax. Logprobs are those of the model's
distribution (log-softmax of the logits, before temperature, top-k and top-p), which is what clients that score
text through an API expect.
"""

from __future__ import annotations

import torch

from sparselm.model.generate import SamplingConfig, sample_next
from sparselm.serve.sequence import Sequence, TokenLogprob


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """``logits`` [R, V] fp32, row r for ``seqs[r]`` -> one token per row."""
    chosen = [0] * len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if greedy:
        best = (logits if len(greedy) == len(seqs) else logits[greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, best, strict=True):
            chosen[i] = token
    for i, seq in enumerate(seqs):
        if seq.params.greedy:
            continue
        p = seq.params
        cfg = SamplingConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
        chosen[i] = int(sample_next(logits[i : i + 1], cfg, seq.generator)[0])
    return chosen


def token_logprob(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """``logprobs`` [V] of one position -> the logprob of ``token`` and the ``top_n`` best alternatives."""
    top = []
    if top_n > 0:
        values, indices = torch.topk(logprobs, top_n)
        top = list(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)
