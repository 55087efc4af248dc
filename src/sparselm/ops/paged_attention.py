"""Decode attention over a paged KV cache: one query per sequence, every sequence and head of a batch in one call.

The serving engine's decoding sequences each attend one new query over their own keys, which lie in blocks of a
shared pool. PyTorch's CPU attention kernel does that one sequence per call and reads bf16 keys ~4x slower than
fp32 ones, so the cache had to be fp32 and the step made one call per sequence and layer. The C++ kernel in
``paged_attention.cpp`` reads each sequence's keys and values where they lie, block by block through its block
table, in bf16 or fp32, converts them to fp32 in registers and computes scores, softmax and the weighted sum in
fp32, all sequences and heads in one call spread over torch's intra-op threads: memory-bound, each key read once
(docs/benchmarks.md, "Decode attention kernel", has the measurements).

The kernel is compiled on first use (:mod:`sparselm.ops.extension`). Where it cannot be built,
``unavailable_reason`` says why and callers keep PyTorch's attention.
``SPARSELM_PAGED_ATTENTION=off`` turns it off (to compare).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from sparselm.ops.extension import build

SOURCE = Path(__file__).with_name("paged_attention.cpp")


@functools.cache
def _load() -> str | None:
    """Build and load the kernel once per process; None if loaded, else why it could not be."""
    return build("sparselm_paged_attention", SOURCE, "SPARSELM_PAGED_ATTENTION")


def kernel_available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernel is not in use, or None when it is."""
    return _load()


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """``q`` [S, H, D] one query per sequence; ``k_pool``/``v_pool`` [H, blocks, block_size, D] one layer's pool
    (bf16 or fp32); ``tables`` [S, W] int64 block ids of each sequence in order (unused entries are ignored);
    ``lengths`` [S] int64 keys of each sequence (its first ``lengths[s]`` slots) -> [S, H, D] fp32.
    ``scale`` defaults to 1/sqrt(D), as in ``scaled_dot_product_attention``."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"paged decode attention is unavailable: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.sparselm_paged.decode_attention(q.float().contiguous(), k_pool, v_pool, tables, lengths, scale)


def paged_decode_attention_reference(q, k_pool, v_pool, tables, lengths, scale: float | None = None) -> torch.Tensor:
    """The same result from PyTorch ops (a gather and ``scaled_dot_product_attention`` per sequence, in fp32): what
    the kernel must equal."""
    block = k_pool.shape[2]
    out = []
    for s in range(q.shape[0]):
        length = int(lengths[s])
        blocks = tables[s, : (length + block - 1) // block]
        k = k_pool[:, blocks].flatten(1, 2)[:, :length].float()  # [H, length, D]
        v = v_pool[:, blocks].flatten(1, 2)[:, :length].float()
        out.append(F.scaled_dot_product_attention(q[s].float().unsqueeze(1), k, v, scale=scale).squeeze(1))
    return torch.stack(out)
