"""Expert row blocks rounded up to a multiple of a few rows, zero rows filling the gaps (for oneDNN on CPU).

oneDNN, which runs PyTorch's bf16 and fp16 matmuls on CPU, compiles a kernel for every operand shape it meets and
keeps it in a cache. An expert's row count changes at every training step as the routing moves, so the loop kernel
kept meeting GEMM shapes it had never seen and paid for compiling them: about 40% of the loop's time at the
default model's shape (docs/benchmarks.md, "Expert row counts and oneDNN's kernel cache"). With every expert's
rows rounded up to a multiple of ``multiple``, a few dozen shapes per GEMM cover all routings and stay cached.
The padding rows are zero in the inputs and the gates and are dropped from the outputs, so they add exactly zero
to every gradient. The multiple grows with the experts' mean rows (:func:`alignment_for`), so that the padding stays
a few percent of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured on the loop and in training steps with new row counts at every step (docs/benchmarks.md, "Expert row counts
# and oneDNN's kernel cache"): the mean's sixteenth, rounded down to a power of two; no padding below 32 rows.
MIN_MEAN_ROWS = 32
MEAN_OVER_MULTIPLE = 16


def alignment_for(counts: list[int], largest: int) -> int:
    """The multiple to pad these experts' rows to (1: none), at most ``largest``."""
    busy = [n for n in counts if n]
    if not busy or largest <= 1:
        return 1
    mean = sum(busy) / len(busy)
    if mean < MIN_MEAN_ROWS:
        return 1
    multiple = 1 << (int(mean // MEAN_OVER_MULTIPLE).bit_length() - 1)
    return min(multiple, 1 << (largest.bit_length() - 1))


@dataclass(frozen=True)
class AlignedRows:
    """Where each real row sits in the padded layout; ``rows`` is None when no expert needed padding."""

    counts: list[int]  # rows per expert in the padded layout
    rows: torch.Tensor | None  # [M] padded-layout position of each real row (rows sorted by expert)
    total: int  # rows in the padded layout

    @staticmethod
    def of(counts: list[int], multiple: int, device: torch.device | str = "cpu") -> AlignedRows:
        """The layout of ``counts`` (rows per expert) with each expert's block rounded up to ``multiple`` rows."""
        if multiple < 1:
            raise ValueError(f"rows must align to a multiple of at least 1, got {multiple}")
        padded = [-(-n // multiple) * multiple for n in counts]
        if padded == counts:
            return AlignedRows(list(counts), None, sum(counts))
        real = torch.tensor(counts, dtype=torch.int64, device=device)
        shift = torch.tensor(padded, dtype=torch.int64, device=device).cumsum(0) - real.cumsum(0)
        shift = torch.cat([shift.new_zeros(1), shift[:-1]])  # padding rows before each expert's block
        rows = torch.arange(sum(counts), device=device) + shift.repeat_interleave(real)
        return AlignedRows(padded, rows, sum(padded))

    def spread(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """[M, ...] real rows -> [total, ...] with zero padding rows."""
        if t is None or self.rows is None:
            return t
        out = t.new_zeros(self.total, *t.shape[1:])
        return out.index_copy_(0, self.rows, t)

    def gather(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """[total, ...] padded layout -> [M, ...] real rows."""
        if t is None or self.rows is None:
            return t
        return t.index_select(0, self.rows)
