"""One sequence being served: its tokens, where its keys and values are, what it has produced, and its text.

A sequence's tokens are its prompt followed by its output. ``num_computed`` of them have keys and values in the
cache; the engine feeds ``tokens[num_computed:]`` (one token when decoding, a chunk of the prompt when prefilling,
everything again after a preemption) and samples a new token whenever the forward reached the last one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from sparselm.serve.kv_cache import block_hash
from sparselm.serve.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely tokens and their logprobs, best first


@dataclass
class SequenceOutput:
    """What one step produced for one sequence (the engine hands a step's outputs over together)."""

    request_id: str
    index: int
    new_tokens: list[int]
    text_delta: str
    logprobs: list[TokenLogprob]  # one per new token when logprobs were asked for
    finished: bool
    finish_reason: str | None  # stop | length | abort
    seq: Sequence | SequenceRecord | None  # None: unchanged since the last record sent (engine process)


@dataclass
class SequenceRecord:
    """What the server reads of a sequence (its response, usage and latencies), without what only the engine needs
    (generator, blocks, text tracker): small enough to cross from the engine's process to the server's."""

    prompt: list[int]
    output: list[int]
    output_logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None]
    text: str
    cached_tokens: int
    arrival: float
    first_token_time: float | None
    token_times: list[float]


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # None for the first token
    status: Status = Status.WAITING
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks of ``tokens``, in order
    committed: int = 0  # blocks of ``blocks`` already offered to the prefix cache
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    text: str = ""  # the output's text, cut before a stop string once one appears
    preemptions: int = 0
    tokens: list[int] = field(default_factory=list)  # prompt + output, kept as one list (read every step)
    index: int = 0  # which choice of its request this sequence is
    text_tracker: TextTracker | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    def record(self) -> SequenceRecord:
        return SequenceRecord(
            self.prompt, self.output, self.output_logprobs, self.prompt_logprobs, self.text, self.cached_tokens,
            self.arrival, self.first_token_time, self.token_times,
        )  # fmt: skip

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.output.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """Hashes of every full block of the tokens so far (extends the cached list as tokens arrive)."""
        tokens = self.tokens
        while (len(self.hashes) + 1) * block_size <= len(tokens):
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else b""
            self.hashes.append(block_hash(parent, tokens[i * block_size : (i + 1) * block_size]))
        return self.hashes


class TextTracker:
    """The output's text, decoded incrementally and released as deltas that never change afterwards.

    Each update decodes only a window of recent tokens: the text of ``ids[prefix:]`` minus that of
    ``ids[prefix:read]``, where ``read`` is where the last released text ended (so the cost per token does not grow
    with the output, and SentencePiece's dropped leading space cancels out). The window starts inside the prompt,
    so the output's first word keeps its space. Text that may still change is held back: a trailing replacement
    character (a character split over byte tokens) and any tail that could begin a stop string.
    """

    ANCHOR = 4

    def __init__(self, tokenizer, prompt: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt[-self.ANCHOR :])
        self.prefix, self.read = 0, len(self.ids)
        self.consumed = 0  # output tokens taken into ``ids``
        self.text = ""  # decoded output so far (complete characters)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.released = 0
        self.stopped = False

    def update(self, output: list[int], final: bool) -> tuple[str, str, bool]:
        """``output`` is the whole output so far -> (its text, new text to release, whether a stop string ended
        the output: the text is then cut before it)."""
        if self.stopped:
            return self.text, "", True
        self.ids.extend(output[self.consumed :])
        self.consumed = len(output)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        searched_from = max(0, len(self.text) - self.hold)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            found = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
            if found:
                self.text, self.stopped, final = self.text[: min(found)], True, True
        stable = len(self.text) if final else max(self.released, len(self.text) - self.hold)
        delta = self.text[self.released : stable]
        self.released = max(self.released, stable)
        return self.text, delta, self.stopped


def token_text(tokenizer, token: int) -> str:
    """How one token reads in a logprobs listing: its piece, with SentencePiece's word marker as a space and byte
    pieces as their character where that is one byte of text."""
    piece = tokenizer.id_to_piece(token)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        value = int(piece[3:5], 16)
        return chr(value) if value < 0x80 else piece
    return piece.replace("\u2581", " ")
