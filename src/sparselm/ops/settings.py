"""Tuning knobs of the CPU expert-loop kernel, read once and then held by the op (never module globals)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sparselm.errors import ConfigError

THREADS_ENV = "SPARSELM_EXPERT_THREADS"


@dataclass(frozen=True)
class ExpertLoopSettings:
    """How the loop kernel (:class:`sparselm.ops.ExpertLoop`) spreads experts over threads and reuses memory.

    ``threads``: split the experts into this many groups that run at the same time, each GEMM single-threaded.
    0 = one group per torch intra-op thread, but only when the experts average fewer than ``split_below_rows`` rows
    (bigger experts keep every thread busy inside their own GEMMs); 1 = the serial loop.
    ``reuse_grad_buffers``: write expert weight gradients into memory recycled from earlier steps (CPU only).
    ``align_rows``: in bf16 and fp16 on CPU, round every expert's rows up to a multiple of at most this with zero
    rows, so that oneDNN meets few GEMM shapes and compiles none after the first steps; the multiple follows the
    experts' mean rows (:func:`sparselm.ops.row_alignment.alignment_for`); 1 = never pad.
    docs/benchmarks.md ("The MoE expert kernel") has the measurements behind the defaults.
    """

    threads: int = 0
    split_below_rows: int = 1024
    reuse_grad_buffers: bool = True
    align_rows: int = 32

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"expert loop threads must be >= 0 (0 = automatic), got {self.threads}")
        if self.split_below_rows < 0:
            raise ConfigError(f"expert loop split_below_rows must be >= 0, got {self.split_below_rows}")
        if self.align_rows < 1:
            raise ConfigError(f"expert loop align_rows must be >= 1 (1 = no padding), got {self.align_rows}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ExpertLoopSettings:
        """The defaults, with ``threads`` from ``SPARSELM_EXPERT_THREADS`` when it is set."""
        value = environ.get(THREADS_ENV, "").strip()
        if not value:
            return cls()
        if not value.isdigit():
            raise ConfigError(f"{THREADS_ENV} must be a non-negative integer, got {value!r}")
        return cls(threads=int(value))
