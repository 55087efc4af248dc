"""Iteration-level scheduling (continuous batching): which sequences run this step and how many tokens each feeds.

Every step, under a budget of ``max_batched_tokens`` tokens:
1. running sequences, oldest first, each feed what they have not computed yet: one token when decoding, a chunk of
   the prompt (as much as the budget leaves) when prefilling. A sequence whose next tokens need a block the pool does
   not have preempts the newest running sequence (its blocks are freed; it goes back to the head of the queue and
   is recomputed later, mostly from the prefix cache) until the block is found or it is itself the newest;
2. then, if nothing was preempted, waiting sequences in arrival order join while the budget, ``max_num_seqs`` and
   the pool allow, each starting after the longest prefix of full blocks the prefix cache holds.
A sequence leaves the running set the step it finishes (or is aborted), so its place and blocks go to the next.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from sparselm.serve.kv_cache import BlockPool
from sparselm.serve.sequence import Sequence, Status


@dataclass
class SchedulerCounters:
    preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found (their keys and values were not computed again)


class Scheduler:
    def __init__(
        self, pool: BlockPool, block_size: int, max_num_seqs: int, max_batched_tokens: int, max_seq_len: int
    ) -> None:
        self.pool = pool
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # by arrival, oldest first: the last one is the first preempted
        self.counters = SchedulerCounters()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> (sequence, tokens to feed) for this step."""
        budget = self.max_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it was the newest and gave its own blocks up
            plan.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            hit = self._lookup_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                self._release(seq)  # try again once blocks are free; the looked-up prefix may be gone by then
                break
            self.waiting.popleft()
            if seq.preemptions == 0:
                self.counters.prefix_queries += len(seq.prompt)
                self.counters.prefix_hits += hit
                seq.cached_tokens = hit
            seq.status = Status.RUNNING
            keys = [s.arrival for s in self.running]
            self.running.insert(bisect.bisect_right(keys, seq.arrival), seq)
            plan.append((seq, n))
            budget -= n
        return plan

    def computed(self, plan: list[tuple[Sequence, int]]) -> None:
        """The step ran: advance each sequence and offer its newly full blocks to the prefix cache."""
        bs = self.block_size
        for seq, n in plan:
            seq.num_computed += n
            full = seq.num_computed // bs
            if full > seq.committed:
                hashes = seq.full_block_hashes(bs)
                for j in range(seq.committed, full):
                    self.pool.commit(seq.blocks[j], hashes[j])
                seq.committed = full

    def finish(self, seq: Sequence) -> None:
        """Remove a running or waiting sequence and free its blocks (finished or aborted)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _lookup_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks of the sequence's longest cached prefix; -> tokens found. At least the last token
        is always computed (its logits give the next token), and prompts whose logprobs are wanted are computed
        in full (the cache holds keys and values, not logits)."""
        if seq.blocks or seq.needs_prompt_logprobs:
            return 0
        usable = (seq.num_tokens - 1) // self.block_size
        blocks = self.pool.lookup(seq.full_block_hashes(self.block_size)[:usable])
        seq.blocks = blocks
        seq.committed = len(blocks)
        seq.num_computed = len(blocks) * self.block_size
        return seq.num_computed

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Make the sequence own blocks for its first ``upto`` tokens; False (nothing taken) if the pool is short."""
        needed = -(-upto // self.block_size) - len(seq.blocks)
        if needed <= 0:
            return True
        # the blocks it will hold if it runs to max_tokens: the pool keeps that much room after them if it can
        final = -(-min(len(seq.prompt) + seq.params.max_tokens, self.max_seq_len) // self.block_size)
        room = final - len(seq.blocks)
        blocks = self.pool.allocate(needed, after=seq.blocks[-1] if seq.blocks else None, room=room)
        if blocks is None:
            return False
        seq.blocks.extend(blocks)
        return True

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.committed = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)
