"""What a request asks for (``SamplingParams``) and how the engine is sized (``EngineConfig``), both validated on
construction with one-line ``InputError``s that name the field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sparselm.errors import InputError

MAX_LOGPROBS = 20  # top-N alternatives per token, as OpenAI's chat API allows


@dataclass
class SamplingParams:
    """Per-request generation settings (one sequence; a request with ``n`` choices makes ``n`` of these)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables the filter
    top_p: float = 1.0
    seed: int | None = None  # None: the engine draws one
    stop: tuple[str, ...] = ()  # the output ends before the first of these strings (not included)
    ignore_eos: bool = False  # keep generating past the end-of-document token (benchmarks)
    logprobs: int | None = None  # None: no logprobs; N >= 0: the chosen token's logprob and the top N
    prompt_logprobs: int | None = None  # the same for every prompt token (``echo`` with logprobs)

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        _integer("max_tokens", self.max_tokens, low=1)
        _integer("top_k", self.top_k, low=0)
        if self.seed is not None:
            _integer("seed", self.seed, low=0)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=0, high=MAX_LOGPROBS)
        for name, low, high in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a number, got {value!r}")
            if not low <= value <= high or (name == "top_p" and value == 0):
                raise InputError(f"{name} must be in {'(' if name == 'top_p' else '['}{low:g}, {high:g}], got {value}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 4:
            raise InputError(f"stop takes at most 4 strings, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _integer(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{name} must be {bound}, got {value}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}  # KB, MB...: powers of 1000


def parse_bytes(text: str | int) -> int:
    """``2GiB``, ``512MiB``, ``1.5G``, ``1000000`` -> bytes (KiB = 1024, KB = K = 1000)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise InputError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit  # KiB, MiB...: powers of 1024
    factor = 1024 ** ("kmgt".index(unit[0]) + 1) if binary else _UNITS[unit[:1]]
    return int(number * factor)


@dataclass
class EngineConfig:
    """How the engine batches and where its KV cache comes from."""

    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences running at once
    # Tokens per step (prefill chunks + one per decoding sequence). Larger steps feed the CPU's matmuls, above all the
    # experts', more rows at once; smaller ones bound how long a prompt chunk stalls the decoding sequences
    # (docs/serving.md, "Options").
    max_batched_tokens: int = 2048
    kv_cache_memory: int = 0  # bytes for the KV pool; 0: enough for max_num_seqs sequences of max_seq_len
    prefix_caching: bool = True
    precision: str = "auto"  # auto | bf16 | fp32 (weights; the KV cache too unless kv_cache_dtype says otherwise)
    kv_cache_dtype: str = "auto"  # auto (precision.kv_cache_dtype's rule) | bf16 | fp32
    seed: int = 0  # draws the seeds of requests that give none
    step_threads: str = "auto"  # torch threads per step: auto (engine.threads_for_step) or a number for every step

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_batched_tokens"):
            _integer(name, getattr(self, name), low=1)
        _integer("kv_cache_memory", self.kv_cache_memory, low=0)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.kv_cache_dtype not in ("auto", "bf16", "fp32"):
            raise InputError(f"kv_cache_dtype must be auto, bf16 or fp32, got {self.kv_cache_dtype!r}")
        self.step_threads = str(self.step_threads)
        if self.step_threads != "auto" and not (self.step_threads.isdigit() and int(self.step_threads) >= 1):
            raise InputError(f"step_threads must be auto or a whole number >= 1, got {self.step_threads!r}")
