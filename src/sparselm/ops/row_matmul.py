"""Matrix products of a few rows, for decoding: one token per sequence through a linear layer or the experts.

At one row, PyTorch's CPU matmul runs far below the memory bandwidth: a bf16 ``F.linear`` of one row against a
256 x 256 weight takes ~50 us (docs/benchmarks.md, "Few-row matmuls"), so a decoding step of a small model is
mostly matmul calls that read little. The C++ kernels in ``row_matmul.cpp`` read each weight element once, widen it
to fp32 in registers and use it for up to 4 rows at once, split over torch's intra-op threads:

- :func:`linear_rows`: ``x @ weight.T`` for a linear layer's ``[out, in]`` weight;
- :func:`expert_rows`: ``x[rows of e] @ weight[e]`` for every expert ``e`` at once, over the experts' ``[E, in, out]``
  weights and the rows sorted by expert (idle experts' weights are not read);
- :func:`row_experts`: the whole expert FFN (the arguments and result of :class:`sparselm.ops.ExpertLoop`) on them,
  which ``model/moe.py`` takes at inference when :func:`prefer_rows` says so.

:func:`linear` is ``F.linear`` that takes the kernel where it pays (:func:`use_rows`: at most ``LINEAR_MAX_ROWS``
rows, and :func:`applies`: no autograd, no autocast, CPU, equal fp32 or bf16 dtypes) and ``F.linear`` everywhere
else, so training, evaluation and prefill never see it. Results equal PyTorch's within float rounding (fp32 sums in
another order). Compiled on first use (:mod:`sparselm.ops.extension`); where it cannot be built, or with
``SPARSELM_ROW_MATMUL=off``, every call takes PyTorch's path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from sparselm.ops.extension import build

SOURCE = Path(__file__).with_name("row_matmul.cpp")
# When the kernels beat PyTorch's (docs/benchmarks.md, "Few-row matmuls"; the decode steps of 3 and 4 sequences in
# "Where the concurrency-16 ratio goes"): a linear layer's rows in one call, one weight read, up to LINEAR_MAX_ROWS;
# the experts while the kernel's weight reads (one per busy expert and group of ROWS_PER_READ of its rows) stay
# within EXPERT_READS_FACTOR times the number of experts (the padded kernel reads every expert once).
LINEAR_MAX_ROWS = 4
ROWS_PER_READ = 4  # the C++ side's kRows
EXPERT_READS_FACTOR = 1.25
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _load() -> str | None:
    """Build and load the kernels once per process; None if loaded, else why they could not be."""
    return build("sparselm_row_matmul", SOURCE, "SPARSELM_ROW_MATMUL")


def kernel_available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernels are not in use, or None when they are."""
    return _load()


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether products of ``x`` with ``weight`` may go through the kernels at all: inference (no autograd, no
    autocast), plain CPU tensors (not DTensor shards), equal fp32/bf16 dtypes, and the kernels built."""
    return (
        not torch.is_grad_enabled()
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _DTYPES
        and not torch.is_autocast_enabled("cpu")
        and _load() is None
    )


def use_rows(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether a linear layer's ``rows`` rows go through :func:`linear_rows`."""
    return 0 < rows <= LINEAR_MAX_ROWS and applies(x, weight)


def prefer_rows(counts: list[int]) -> bool:
    """Whether :func:`row_experts` should compute the experts for these rows per expert (where :func:`applies`):
    its weight reads stay within ``EXPERT_READS_FACTOR`` times the experts. One to a few decoding tokens, or a step
    of many spread over many experts, take it; a prompt's rows crowding a few experts do not."""
    reads = sum(-(-c // ROWS_PER_READ) for c in counts)
    return 0 < reads <= EXPERT_READS_FACTOR * len(counts)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through :func:`linear_rows` when :func:`use_rows` says so."""
    features = x.shape[-1]
    if features == 0 or not use_rows(x, weight, x.numel() // features):
        return F.linear(x, weight, bias)
    y = linear_rows(x.reshape(-1, features), weight).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def linear_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [M, in] times ``weight`` [out, in] transposed -> [M, out] in ``x``'s dtype (fp32 or bf16 each)."""
    _require()
    return torch.ops.sparselm_rows.linear_rows(x.contiguous(), weight.contiguous())


def expert_rows(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [M, in] sorted by expert, ``counts`` [E] int64 rows per expert, ``weight`` [E, in, out] -> [M, out]:
    each expert's rows times its weight, in ``x``'s dtype."""
    _require()
    return torch.ops.sparselm_rows.expert_rows(x.contiguous(), counts, weight.contiguous())


def row_experts(x, gates, counts, w_up, w_gate, w_down, b_up, b_down) -> torch.Tensor:
    """The expert FFN with :func:`expert_rows`: same arguments and result as :class:`sparselm.ops.ExpertLoop`
    (``counts`` a tensor or a list; the weights in ``x``'s dtype)."""
    counts = torch.as_tensor(counts, dtype=torch.long, device=x.device)
    expert_of_row = None
    if b_up is not None or b_down is not None:
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    h = expert_rows(x, counts, w_up)
    if b_up is not None:
        h = h + b_up[expert_of_row]
    h = F.silu(expert_rows(x, counts, w_gate)) * h if w_gate is not None else F.gelu(h, approximate="tanh")
    y = expert_rows(h, counts, w_down)
    if b_down is not None:
        y = y + b_down[expert_of_row]
    if gates is not None:
        y = y * gates.to(y.dtype).unsqueeze(-1)
    return y


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the few-row matmul kernels are unavailable: {reason}")
