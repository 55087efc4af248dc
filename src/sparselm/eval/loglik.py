"""Batched scoring engine: log-likelihood of continuations, rolling log-likelihood of long texts, greedy generation.

Both ``sparselm eval`` and the lm-evaluation-harness adapter call this module, so the two report the same numbers.

Conventions (lm-eval's, so scores are comparable with published ones):

- ``encode_pair``: trailing spaces of the context move to the front of the continuation; the continuation tokens are
  those of ``encode(context + continuation)`` past ``len(encode(context))``. An empty context is replaced by the
  end-of-document token (documents are separated by it in training, so it is the model's "start of text").
- Too long for the model: the context is cut from the left so that context + continuation fit in
  ``max_seq_len + 1`` tokens (the last token is never fed); the number of dropped tokens is reported. A continuation
  longer than ``max_seq_len`` cannot be scored and comes back with ``ok=False``.
- ``is_greedy`` is true when every continuation token is the argmax of the model's next-token distribution given
  the context and the preceding continuation tokens, i.e. greedy decoding would produce exactly those tokens.

How a batch runs: requests that share a context (the options of one question) form a group; the contexts of a few
groups are left-padded and prefilled once into a KV cache, the cache rows are copied once per option, then all the
continuations run in one more forward, right-padded. Padding is marked invalid and every sequence keeps its own
positions, so a request scores the same alone or batched (up to float rounding). Batches are formed from groups
sorted by length (little padding) and bounded by ``batch_size`` rows and ``max_batch_tokens`` logits rows, which
caps the [rows, length, vocab] logits tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparselm.errors import InputError
from sparselm.model.generate import SamplingConfig, generate, left_pad
from sparselm.model.generate import Tokenizer as TokenizerLike
from sparselm.model.transformer import Transformer
from sparselm.precision import autocast


@dataclass
class LoglikResult:
    logprob: float  # summed log-probability (nats) of the continuation tokens
    is_greedy: bool
    tokens: int  # continuation tokens scored
    truncated: int = 0  # context tokens dropped on the left to fit the model
    ok: bool = True  # False: the continuation alone does not fit the model; logprob is meaningless


class Scorer:
    """Scores token or text requests against one model. ``tokenizer`` needs ``encode``, ``decode`` and ``eod_id``."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        batch_size: int = 16,
        precision: str = "fp32",
        max_batch_tokens: int = 8192,
    ) -> None:
        if batch_size < 1 or max_batch_tokens < 1:
            raise InputError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
        autocast(precision, model.tok_emb.weight.device)  # validate early
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.precision = precision
        self.max_batch_tokens = max_batch_tokens
        self.max_len = model.cfg.max_seq_len
        self.eod_id = tokenizer.eod_id
        self.device = model.tok_emb.weight.device

    # ----------------------------------------------------------------------------------------------- encoding
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        if stripped != context:
            continuation = context[len(stripped) :] + continuation
            context = stripped
        if not context:
            return [self.eod_id], list(self.tokenizer.encode(continuation))
        context_ids = list(self.tokenizer.encode(context))
        whole = list(self.tokenizer.encode(context + continuation))
        return context_ids, whole[len(context_ids) :]

    def loglikelihood_text(
        self, pairs: list[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[LoglikResult]:
        return self.loglikelihood([self.encode_pair(c, x) for c, x in pairs], progress)

    # ------------------------------------------------------------------------------------------ log-likelihood
    @torch.inference_mode()
    def loglikelihood(
        self, requests: list[tuple[list[int], list[int]]], progress: Callable[[int], None] | None = None
    ) -> list[LoglikResult]:
        """Score (context ids, continuation ids) pairs; ``progress(i)`` is called once per finished request index."""
        results: list[LoglikResult | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(requests):
            if not continuation:
                raise InputError(f"request {i}: the continuation encodes to no tokens")
            if len(continuation) > self.max_len:
                results[i] = LoglikResult(float("nan"), False, len(continuation), ok=False)
                if progress:
                    progress(i)
                continue
            context = list(context) or [self.eod_id]
            keep = self.max_len + 1 - len(continuation)
            dropped = max(0, len(context) - keep)
            results[i] = LoglikResult(0.0, False, len(continuation), truncated=dropped)
            groups.setdefault(tuple(context[dropped:]), []).append(i)

        # Longest first: the batch most likely to run out of memory runs first, and similar lengths pad little.
        items = []
        for context, members in groups.items():
            width = len(context) + max(len(requests[i][1]) for i in members)
            per_chunk = max(1, min(self.batch_size, self.max_batch_tokens // width))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                items.append((len(context) + max(len(requests[i][1]) for i in chunk), context, chunk))
        items.sort(key=lambda item: (-item[0], item[1]))
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        rows, batch_width = 0, 0
        for width, context, chunk in items:
            # Items come longest first, so the first item's width is the widest row of its batch.
            if batch and (
                rows + len(chunk) > self.batch_size or (rows + len(chunk)) * batch_width > self.max_batch_tokens
            ):
                self._run_batch(batch, requests, results, progress)
                batch, rows = [], 0
            if not batch:
                batch_width = width
            batch.append((context, chunk))
            rows += len(chunk)
        if batch:
            self._run_batch(batch, requests, results, progress)
        return results  # type: ignore[return-value]

    def _run_batch(
        self,
        batch: list[tuple[tuple[int, ...], list[int]]],
        requests: list[tuple[list[int], list[int]]],
        results: list[LoglikResult | None],
        progress: Callable[[int], None] | None,
    ) -> None:
        model, device = self.model, self.device
        contexts = [list(context) for context, _ in batch]
        members = [i for _, chunk in batch for i in chunk]
        groups = [g for g, (_, chunk) in enumerate(batch) for _ in chunk]
        group_of_row = torch.tensor(groups, device=device)
        conts = [list(requests[i][1]) for i in members]
        ctx_width = max(len(c) for c in contexts)
        cont_width = max(len(c) for c in conts) - 1  # the last continuation token is predicted, never fed

        with autocast(self.precision, self.device):
            # 1. Prefill each distinct context once (left-padded: every row's last context token is in the last slot).
            idx, positions, valid = left_pad(contexts, device=device)
            prefill = model.new_cache(len(contexts), ctx_width, dtype=_cache_dtype(self.precision))
            first_logits = model(idx, positions=positions, valid=valid, cache=prefill, last_only=True).logits[:, -1]
            first_logprobs = F.log_softmax(first_logits.float(), dim=-1).index_select(0, group_of_row)  # [N, V]
            cont_logprobs = None
            if cont_width > 0:
                # 2. One cache row per option, copied from its group's prefill, then all continuations in one forward.
                cache = model.new_cache(len(members), ctx_width + cont_width, dtype=prefill.k.dtype)
                cache.k[:, :, :, :ctx_width] = prefill.k.index_select(1, group_of_row)
                cache.v[:, :, :, :ctx_width] = prefill.v.index_select(1, group_of_row)
                cache.positions[:, :ctx_width] = prefill.positions.index_select(0, group_of_row)
                cache.valid[:, :ctx_width] = prefill.valid.index_select(0, group_of_row)
                cache.length = ctx_width
                idx = torch.zeros(len(members), cont_width, dtype=torch.long)
                pos = torch.zeros(len(members), cont_width, dtype=torch.long)
                ok = torch.zeros(len(members), cont_width, dtype=torch.bool)
                for row, cont in enumerate(conts):
                    n = len(cont) - 1
                    start = len(contexts[groups[row]])
                    idx[row, :n] = torch.tensor(cont[:-1])
                    pos[row, :n] = torch.arange(start, start + n)  # pads stay at position 0: always in range
                    ok[row, :n] = True
                out = model(idx.to(device), positions=pos.to(device), valid=ok.to(device), cache=cache)
                cont_logprobs = F.log_softmax(out.logits.float(), dim=-1)  # [N, cont_width, V]

        for row, (i, cont) in enumerate(zip(members, conts, strict=True)):
            target = torch.tensor(cont, device=device)
            if cont_logprobs is not None:
                steps = torch.cat([first_logprobs[row : row + 1], cont_logprobs[row, : len(cont) - 1]])
            else:
                steps = first_logprobs[row : row + 1]
            picked = steps.gather(1, target.unsqueeze(1)).squeeze(1)
            result = results[i]
            result.logprob = float(picked.double().sum())
            result.is_greedy = bool((steps.argmax(dim=-1) == target).all())
            if progress:
                progress(i)

    # --------------------------------------------------------------------------------------- rolling windows
    def rolling_requests(
        self, tokens: Sequence[int], stride: int = 0, window: int = 0
    ) -> list[tuple[list[int], list[int]]]:
        """Split ``[eod] + tokens`` into windows of at most ``window`` inputs (default and maximum:
        ``max_seq_len``) that predict every token once.

        ``stride`` (default and maximum: ``window``) is how many new tokens each window after the first predicts;
        the rest of the window is context. With the default the windows are disjoint and the last one is filled up
        with earlier context, exactly lm-eval's ``loglikelihood_rolling``.
        """
        window = window or self.max_len
        if not 1 <= window <= self.max_len:
            raise InputError(f"window must be in [1, max_seq_len={self.max_len}], got {window}")
        stride = stride or window
        if not 1 <= stride <= window:
            raise InputError(f"stride must be in [1, window={window}], got {stride}")
        seq = [self.eod_id, *tokens]
        windows = []
        start = 1  # first target not yet predicted
        while start < len(seq):
            end = min(start + (window if start == 1 else stride), len(seq))
            first = max(0, end - 1 - window)
            windows.append((seq[first:start], seq[start:end]))
            start = end
        return windows

    def rolling(
        self, texts: list[str], stride: int = 0, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, int]]:
        """(summed log-likelihood, tokens) of each whole text, conditioned on the end-of-document token."""
        return self.rolling_ids([self.tokenizer.encode(text) for text in texts], stride, progress=progress)

    def rolling_ids(
        self,
        documents: list[Sequence[int]],
        stride: int = 0,
        window: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> list[tuple[float, int]]:
        """(summed log-likelihood, tokens) of each token sequence, conditioned on the end-of-document token.
        ``progress(d)`` is called once per finished document."""
        requests, owner = [], []
        for d, tokens in enumerate(documents):
            for request in self.rolling_requests(tokens, stride, window):
                requests.append(request)
                owner.append(d)
        remaining = [0] * len(documents)
        for d in owner:
            remaining[d] += 1
        if progress:
            for d in range(len(documents)):
                if remaining[d] == 0:  # an empty document has nothing to score
                    progress(d)

        def window_done(i: int) -> None:
            remaining[owner[i]] -= 1
            if progress and remaining[owner[i]] == 0:
                progress(owner[i])

        totals = [[0.0, 0] for _ in documents]
        for d, result in zip(owner, self.loglikelihood(requests, window_done), strict=True):
            totals[d][0] += result.logprob
            totals[d][1] += result.tokens
        return [(float(s), int(n)) for s, n in totals]

    # -------------------------------------------------------------------------------------------- generation
    def generate_until(
        self,
        prompts: list[str],
        until: list[str],
        max_gen_tokens: int,
        progress: Callable[[int], None] | None = None,
    ) -> list[tuple[str, int]]:
        """Greedy continuation of each prompt, cut before the first stop string (and at end of document).

        Returns (text, prompt tokens dropped on the left to leave room for ``max_gen_tokens``).
        """
        if not 1 <= max_gen_tokens < self.max_len:
            raise InputError(f"max_gen_tokens must be in [1, max_seq_len={self.max_len}), got {max_gen_tokens}")
        encoded = []
        for prompt in prompts:
            ids = list(self.tokenizer.encode(prompt)) or [self.eod_id]
            dropped = max(0, len(ids) - (self.max_len - max_gen_tokens))
            encoded.append((ids[dropped:], dropped))
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
        outputs: list[tuple[str, int]] = [("", 0)] * len(prompts)
        sampling = SamplingConfig(max_new_tokens=max_gen_tokens, greedy=True)
        stops = [s for s in until if s]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            with autocast(self.precision, self.device):
                new = generate(self.model, [encoded[i][0] for i in chunk], sampling, eod_id=self.eod_id)
            for i, ids in zip(chunk, new, strict=True):
                text = self.tokenizer.decode(ids)
                cut = min((text.find(s) for s in stops if s in text), default=len(text))
                outputs[i] = (text[:cut], encoded[i][1])
                if progress:
                    progress(i)
        return outputs


def _cache_dtype(precision: str) -> torch.dtype:
    # Under bf16 autocast keys/values are produced in bf16; storing them so halves the cache and loses nothing.
    return torch.bfloat16 if precision == "bf16" else torch.float32
