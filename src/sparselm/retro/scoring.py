"""``sparselm eval --retro-db`` and ``sparselm ppl --retro-db``: the evaluation scorer with retrieval.

``RetroScorer`` is the harness's ``Scorer`` with one change: a request is scored by a whole-sequence forward (context
+ continuation) with the neighbours of each complete chunk of that sequence, instead of a KV-cached prefill, since
chunked cross-attention sees the sequence chunk by chunk. Batching, truncation and greedy checks are the Scorer's,
so scores with and without retrieval are comparable request by request.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparselm.errors import InputError
from sparselm.eval.loglik import LoglikResult, Scorer
from sparselm.model.generate import SamplingConfig
from sparselm.precision import autocast
from sparselm.retro.retriever import Retriever


def open_retriever(model, tokenizer_path, db_path, k: int = 0, precision: str = "auto") -> Retriever:
    """The database at ``db_path`` checked against the model (tokenizer, chunk size), as a retriever of k
    neighbours per chunk (0: the model's retro.neighbours)."""
    from sparselm.retro.store import Database

    retro = getattr(model, "retro_encoder", None)
    if retro is None:
        raise InputError("--retro-db needs a RETRO model ([retro] enabled = true in its config)")
    db = Database(db_path)
    db.check_model(tokenizer_path, retro.chunk_size)
    return Retriever(db, k or retro.neighbours, precision)


def retro_scorer(db_path, k: int = 0):
    """``make_scorer`` for ``eval.harness.run_eval``: a ``RetroScorer`` retrieving from ``db_path``."""

    def make(model, tokenizer, ckpt_dir, **kwargs) -> RetroScorer:
        retriever = open_retriever(model, ckpt_dir / "tokenizer.model", db_path, k)
        return RetroScorer(model, tokenizer, retriever, **kwargs)

    return make


class RetroScorer(Scorer):
    def __init__(self, model, tokenizer, retriever: Retriever, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.retriever = retriever

    def _run_batch(
        self,
        batch: list[tuple[tuple[int, ...], list[int]]],
        requests: list[tuple[list[int], list[int]]],
        results: list[LoglikResult | None],
        progress: Callable[[int], None] | None,
    ) -> None:
        rows = [(list(context), list(requests[i][1]), i) for context, chunk in batch for i in chunk]
        seqs = [context + cont[:-1] for context, cont, _ in rows]
        width = max(len(s) for s in seqs)
        idx = torch.zeros(len(seqs), width, dtype=torch.long)
        valid = torch.zeros(len(seqs), width, dtype=torch.bool)
        for r, seq in enumerate(seqs):
            idx[r, : len(seq)] = torch.tensor(seq)
            valid[r, : len(seq)] = True
        neighbours = self.retriever.neighbours_for(seqs, width).to(self.device)
        with autocast(self.precision, self.device):
            logits = self.model(idx.to(self.device), valid=valid.to(self.device), neighbours=neighbours).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for r, (context, cont, i) in enumerate(rows):
            steps = logprobs[r, len(context) - 1 : len(context) - 1 + len(cont)]
            target = torch.tensor(cont, device=self.device)
            result = results[i]
            result.logprob = float(steps.gather(1, target.unsqueeze(1)).double().sum())
            result.is_greedy = bool((steps.argmax(dim=-1) == target).all())
            if progress:
                progress(i)

    def generate_until(
        self, prompts: list[str], until: list[str], max_gen_tokens: int, progress: Callable[[int], None] | None = None
    ) -> list[tuple[str, int]]:
        from sparselm.retro.generate import retro_generate

        if not 1 <= max_gen_tokens < self.max_len:
            raise InputError(f"max_gen_tokens must be in [1, max_seq_len={self.max_len}), got {max_gen_tokens}")
        outputs = []
        sampling = SamplingConfig(max_new_tokens=max_gen_tokens, greedy=True)
        for i, prompt in enumerate(prompts):
            ids = list(self.tokenizer.encode(prompt)) or [self.eod_id]
            dropped = max(0, len(ids) - (self.max_len - max_gen_tokens))
            with autocast(self.precision, self.device):
                new, _ = retro_generate(self.model, self.retriever, ids[dropped:], sampling, self.eod_id)
            text = self.tokenizer.decode(new)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            outputs.append((text[:cut], dropped))
            if progress:
                progress(i)
        return outputs
