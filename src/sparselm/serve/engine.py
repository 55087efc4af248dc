"""The serving engine: continuous batching over a paged KV cache, one packed forward of the model per step.

No HTTP here: ``Engine`` is used from Python (``generate`` runs prompts to completion) and by the server, which runs
it in a process of its own (``engine_process``) and hears of every step's outputs at once.

One step: take new requests and aborts; schedule (``Scheduler``); lay the scheduled tokens out as one packed row
(decoding sequences first, then prefill chunks) with each token's position and KV slot; one forward of the model
under ``torch.inference_mode`` in which every MoE layer routes all of the step's tokens together (each expert
multiplies one block of rows); logits only for the rows that sample a token or score a prompt token; sample each
sequence with its own settings and generator; record tokens, logprobs and text; free what finished.

Torch's intra-op threads are chosen per step (``EngineConfig.step_threads``, see ``threads_for_step``): a small step
of a small model gains little from a second thread, and in the server that thread's core is what the HTTP side
needs.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparselm.config import ModelConfig
from sparselm.errors import InputError
from sparselm.model.generate import check_prompt
from sparselm.model.moe import MoE
from sparselm.model.transformer import Transformer
from sparselm.ops import causal_attention, paged_attention, row_matmul
from sparselm.precision import kv_cache_dtype, resolve_precision
from sparselm.serve.kv_cache import BlockPool, PagedKVCache, ScheduledChunk, StepCache
from sparselm.serve.params import EngineConfig, SamplingParams
from sparselm.serve.sampling import sample_tokens, token_logprob
from sparselm.serve.scheduler import Scheduler
from sparselm.serve.sequence import Sequence, SequenceOutput, Status, TextTracker


@dataclass
class EngineSnapshot:
    """The engine's state and counters as /metrics reports them (plain values: it crosses processes)."""

    running: int
    waiting: int
    kv_blocks: int
    kv_used: int
    kv_free: int
    kv_cached: int
    prefix_queries: int
    prefix_hits: int
    preemptions: int
    prompt_tokens: int
    generation_tokens: int
    steps: int
    finished: dict[str, int]
    seconds: dict[str, float]
    moe_layers: list[int]
    expert_load: list[list[int]]  # token assignments per expert, one row per MoE layer


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # of the requests that produced a first token
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"schedule": 0.0, "forward": 0.0, "sample": 0.0})


# ``step_threads = auto``: a step of at most ONE_THREAD_MAX_TOKENS tokens of a model of at most
# ONE_THREAD_MAX_WEIGHT_BYTES of weights runs on one torch thread, any other step on all of them (the process's
# --threads). Measured through the server (bf16, 2 cores), 1 against 2 threads for every step: on the demo MoE
# (18 MB of weights) one thread gave more tokens/s and a lower TPOT at concurrency 1 and 4, two threads at 16 and
# 64; on the d512 model (181 MB) two threads gave the lower TPOT at concurrency 1 as well (docs/benchmarks.md,
# "Torch threads per step" and "The decode step"). Both boundaries lie between the measured points.
ONE_THREAD_MAX_TOKENS = 8
ONE_THREAD_MAX_WEIGHT_BYTES = 64 * 2**20


def paged_kernel_refusal(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why decoding sequences cannot attend through the paged decode kernel (``sparselm.ops.paged_attention``), or
    None when they can: it runs on CPU, for attention without a position bias (rope, absolute or none; relative and
    xl add one per query-key pair, which the kernel does not), where it builds."""
    if device.type != "cpu":
        return f"the kernel is CPU-only (device {device.type})"
    if cfg.position in ("relative", "xl"):
        return f"model.position={cfg.position} adds a position bias the kernel does not"
    return paged_attention.unavailable_reason()


def prompt_kernel_refusal(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype
) -> str | None:
    """Why prompt chunks do not attend through the causal-attention kernel (``sparselm.ops.causal_attention``, which
    the model's attention takes for them by itself), or None when they do: CPU, no position bias, bf16 weights and
    a bf16 cache, where the kernel builds and runs."""
    if device.type != "cpu":
        return f"the kernel is CPU-only (device {device.type})"
    if cfg.position in ("relative", "xl"):
        return f"model.position={cfg.position} adds a position bias the kernel does not"
    if dtype != torch.bfloat16 or kv_dtype != torch.bfloat16:
        return "the kernel is bf16-only (weights and KV cache)"
    return causal_attention.unavailable_reason()


def threads_for_step(setting: str, tokens: int, max_threads: int, weight_bytes: int = 0) -> int:
    """Torch intra-op threads for a step of ``tokens`` tokens of a model holding ``weight_bytes`` of weights under
    the ``step_threads`` setting."""
    if setting != "auto":
        return int(setting)
    small = tokens <= ONE_THREAD_MAX_TOKENS and weight_bytes <= ONE_THREAD_MAX_WEIGHT_BYTES
    return 1 if small else max_threads


def kv_cache_blocks(cfg: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> tuple[int, int]:
    """-> (blocks in the pool, bytes per block): ``kv_cache_memory`` bytes' worth, or room for ``max_num_seqs``
    sequences of ``max_seq_len`` tokens. InputError if the pool cannot hold even one full-length sequence."""
    bs = config.block_size
    per_block = PagedKVCache.bytes_per_block(cfg.n_layers, bs, cfg.d_model, dtype)
    blocks_per_seq = -(-cfg.max_seq_len // bs)
    if not config.kv_cache_memory:
        return config.max_num_seqs * blocks_per_seq, per_block
    num_blocks = config.kv_cache_memory // per_block
    if num_blocks < blocks_per_seq:
        raise InputError(
            f"kv_cache_memory={config.kv_cache_memory:,} bytes holds {num_blocks} blocks of {bs} tokens "
            f"({per_block:,} bytes each); one sequence of model.max_seq_len={cfg.max_seq_len} needs "
            f"{blocks_per_seq} ({blocks_per_seq * per_block:,} bytes)"
        )
    return num_blocks, per_block


class Engine:
    """``model`` is converted in place: eval mode, and bf16 weights when the precision resolves to bf16."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        config: EngineConfig | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.eod_id = getattr(tokenizer, "eod_id", None)
        self.max_seq_len = model.cfg.max_seq_len
        device = model.tok_emb.weight.device
        self.device = device
        self.precision = resolve_precision(config.precision, device, warn)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        model.eval()
        model.to(self.dtype)
        moe = model.moe_cfg
        if moe.enabled and not moe.dropless and moe.eval_capacity_factor < moe.num_experts / moe.top_k and warn:
            warn(
                f"moe.eval_capacity_factor={moe.eval_capacity_factor} < num_experts / top_k: experts can drop tokens, "
                "so a request's output depends on what else is in its batch"
            )
        cfg = model.cfg
        refusal = paged_kernel_refusal(cfg, device)
        self.paged_kernel = refusal is None
        self.decode_attention = "sparselm paged kernel" if refusal is None else f"PyTorch SDPA per sequence ({refusal})"
        # Built here, not in the first request's step (~10 s the first time on a machine).
        few_rows = row_matmul.unavailable_reason() if device.type == "cpu" else f"CPU-only (device {device.type})"
        self.decode_matmuls = "sparselm few-row kernels" if few_rows is None else f"PyTorch ({few_rows})"
        self.kv_dtype = kv_cache_dtype(self.dtype, device, config.kv_cache_dtype, self.paged_kernel)
        refusal = prompt_kernel_refusal(cfg, device, self.dtype, self.kv_dtype)
        self.prompt_attention = "sparselm causal kernel" if refusal is None else f"PyTorch SDPA ({refusal})"
        num_blocks, per_block = kv_cache_blocks(cfg, config, self.kv_dtype)
        bs = config.block_size
        self.pool = BlockPool(num_blocks, config.prefix_caching, keep_runs=not self.paged_kernel)
        self.kv = PagedKVCache(
            cfg.n_layers, num_blocks, bs, cfg.n_heads, cfg.d_model // cfg.n_heads, self.kv_dtype, device
        )
        self.kv_bytes = num_blocks * per_block
        self.scheduler = Scheduler(self.pool, bs, config.max_num_seqs, config.max_batched_tokens, cfg.max_seq_len)
        self.moe_layers = [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MoE)]
        experts = moe.num_experts if self.moe_layers else 0
        self.expert_load = torch.zeros(len(self.moe_layers), experts, dtype=torch.long)
        self.stats = EngineStats()
        self._seeds = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._lock = threading.Lock()
        self._by_request: dict[str, list[Sequence]] = {}
        self._num_sequences = 0  # added and not yet finished or aborted, wherever they are (changed under _lock)
        self._outputs: list[SequenceOutput] = []
        self.max_threads = torch.get_num_threads()  # the pool the process was given (--threads)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # ------------------------------------------------------------------------------------------- requests
    def check_prompt(self, prompt: list[int]) -> None:
        check_prompt(prompt, self.model.cfg.vocab_size, self.max_seq_len)

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival: float | None = None,
    ) -> Sequence:
        """Queue one sequence (thread-safe); it joins the running batch at the next step. ``arrival``: when the
        request arrived (``time.monotonic``; default now), from which its latencies are counted."""
        self.check_prompt(prompt)
        with self._lock:
            seed = (
                params.seed + index if params.seed is not None else int(torch.randint(2**62, (), generator=self._seeds))
            )
        seq = Sequence(next(self._ids), request_id, list(prompt), params, torch.Generator().manual_seed(seed))
        seq.index = index
        if arrival is not None:
            seq.arrival = arrival
        seq.text_tracker = TextTracker(self.tokenizer, seq.prompt, params.stop)
        with self._lock:
            self._inbox.append(seq)
            self._num_sequences += 1
        return seq

    def abort(self, request_id: str) -> None:
        """Cancel every sequence of a request (thread-safe); its blocks are free after the next step begins."""
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

    @property
    def num_waiting(self) -> int:
        """Sequences not in the running batch: queued, preempted, or added since the last step began."""
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def num_sequences(self) -> int:
        """Sequences added and not yet finished: running, waiting, or in the inbox. Exact at any moment (what a
        sequence leaving counts is taken off before its last output is handed over), unlike ``num_waiting``,
        which also counts sequences the next step will start because the batch has room for them."""
        return self._num_sequences

    def snapshot(self) -> EngineSnapshot:
        sched, pool, stats = self.scheduler, self.pool, self.stats
        return EngineSnapshot(
            running=len(sched.running), waiting=self.num_waiting, kv_blocks=pool.num_blocks, kv_used=pool.num_used,
            kv_free=pool.num_free, kv_cached=len(pool.cached), prefix_queries=sched.counters.prefix_queries,
            prefix_hits=sched.counters.prefix_hits, preemptions=sched.counters.preemptions,
            prompt_tokens=stats.prompt_tokens, generation_tokens=stats.generation_tokens, steps=stats.steps,
            finished=dict(stats.finished), seconds=dict(stats.seconds), moe_layers=list(self.moe_layers),
            expert_load=self.expert_load.tolist(),
        )  # fmt: skip

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for seq in new:
            self._by_request.setdefault(seq.request_id, []).append(seq)
            self.scheduler.add(seq)
        for request_id in aborts:
            for seq in self._by_request.get(request_id, []):
                if seq.status is not Status.FINISHED:
                    self._finish(seq, "abort")
                    self._emit(seq, [], "", [], finished=True)

    # ----------------------------------------------------------------------------------------------- step
    def step(self) -> list[SequenceOutput]:
        """Run one step; -> what it produced, aborts included."""
        self._outputs = []
        self._step()
        outputs, self._outputs = self._outputs, []
        return outputs

    @torch.inference_mode()
    def _step(self) -> None:
        t0 = time.perf_counter()
        self._take_inbox()
        plan = self.scheduler.schedule()
        if not plan:
            return
        plan.sort(key=lambda item: item[1] != 1)  # decoding sequences first (stable: oldest first)
        ids, positions, chunks, rows, wants = [], [], [], [], []
        for seq, n in plan:
            start = seq.num_computed
            base = len(ids)
            ids.extend(seq.tokens[start : start + n])
            positions.extend(range(start, start + n))
            chunks.append(ScheduledChunk(start, n, seq.blocks))
            first = len(rows)
            if seq.needs_prompt_logprobs:
                rows.extend(range(base, base + n))  # row p scores prompt token p + 1 (and the last samples)
            elif start + n == seq.num_tokens:
                rows.append(base + n - 1)
            wants.append((first, len(rows)))
        device = self.device
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        pos = torch.tensor([positions], dtype=torch.long, device=device)
        cache = StepCache(self.kv, chunks, device, self.paged_kernel)
        row_index = torch.tensor(rows, dtype=torch.long, device=device)
        self._use_threads(threads_for_step(self.config.step_threads, len(ids), self.max_threads, self.weight_bytes))
        t1 = time.perf_counter()
        out = self.model(idx, positions=pos, cache=cache, output_rows=row_index)
        logits = out.logits.float()
        t2 = time.perf_counter()
        if out.moe_stats:
            self.expert_load += torch.stack([s.tokens_per_expert for s in out.moe_stats]).cpu()
        self.scheduler.computed(plan)
        self._process(plan, logits, wants)
        t3 = time.perf_counter()
        self.stats.steps += 1
        self.stats.seconds["schedule"] += t1 - t0
        self.stats.seconds["forward"] += t2 - t1
        self.stats.seconds["sample"] += t3 - t2

    @staticmethod
    def _use_threads(threads: int) -> None:
        # Only on a change (setting the count costs tens of microseconds); the count is the calling thread's.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def release_threads(self) -> None:
        """Give the process back the thread count it had (call when the engine goes idle)."""
        self._use_threads(self.max_threads)

    def _process(self, plan, logits: torch.Tensor, wants) -> None:
        """Prompt logprobs, then one new token for every sequence whose last token was fed."""
        sampling = []
        for (seq, n), (first, last) in zip(plan, wants, strict=True):
            if seq.status is not Status.RUNNING:
                continue
            if seq.needs_prompt_logprobs:
                self._record_prompt_logprobs(seq, logits[first:last], seq.num_computed - n)
            if seq.num_computed == seq.num_tokens and last > first:
                sampling.append((seq, last - 1))
        if not sampling:
            return
        rows = torch.tensor([r for _, r in sampling])
        chosen = logits.index_select(0, rows)
        tokens = sample_tokens(chosen, [seq for seq, _ in sampling])
        need_lp = [i for i, (seq, _) in enumerate(sampling) if seq.params.logprobs is not None]
        logprobs = dict(zip(need_lp, torch.log_softmax(chosen[need_lp], dim=-1), strict=True)) if need_lp else {}
        now = time.monotonic()
        for i, ((seq, _), token) in enumerate(zip(sampling, tokens, strict=True)):
            lps = [token_logprob(logprobs[i], token, seq.params.logprobs)] if i in logprobs else []
            self._accept(seq, token, lps, now)

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first token has no context to be scored in
        logprobs = torch.log_softmax(logits, dim=-1)
        for j in range(logits.shape[0]):
            target = start + j + 1  # row j saw tokens up to start + j and predicts the next one
            if target == len(seq.prompt_logprobs) and target < len(seq.prompt):
                seq.prompt_logprobs.append(token_logprob(logprobs[j], seq.prompt[target], seq.params.prompt_logprobs))

    def _accept(self, seq: Sequence, token: int, lps, now: float) -> SequenceOutput:
        params = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.prompt_tokens += len(seq.prompt)
        if token == self.eod_id and not params.ignore_eos:
            self._finish(seq, "stop")  # end of document: not part of the output
            return self._emit(seq, [], self._text(seq, final=True), [], finished=True)
        seq.append(token)
        seq.output_logprobs.extend(lps)
        seq.token_times.append(now)
        self.stats.generation_tokens += 1
        text = self._text(seq, final=False)
        if seq.finish_reason == "stop":  # a stop string appeared
            self._finish(seq, "stop")
            return self._emit(seq, [token], text, lps, finished=True)
        if len(seq.output) >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            self._finish(seq, "length")
            return self._emit(seq, [token], text + self._text(seq, final=True), lps, finished=True)
        return self._emit(seq, [token], text, lps, finished=False)

    def _text(self, seq: Sequence, final: bool) -> str:
        text, delta, stopped = seq.text_tracker.update(seq.output, final)
        seq.text = text
        if stopped:
            seq.finish_reason = "stop"
        return delta

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        with self._lock:
            self._num_sequences -= 1
        seq.finish_reason = reason
        self.stats.finished[reason] += 1
        siblings = self._by_request.get(seq.request_id, [])
        if all(s.status is Status.FINISHED for s in siblings):
            self._by_request.pop(seq.request_id, None)

    def _emit(self, seq, tokens, delta, lps, finished: bool) -> SequenceOutput:
        out = SequenceOutput(seq.request_id, seq.index, tokens, delta, lps, finished, seq.finish_reason, seq)
        self._outputs.append(out)
        return out

    # ------------------------------------------------------------------------------------------ library use
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run ``prompts`` (all queued at once) to completion; -> their finished sequences, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        seqs = [self.add_request(f"gen-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        try:
            while any(s.status is not Status.FINISHED for s in seqs):
                self.step()
        finally:
            self.release_threads()
        return seqs
