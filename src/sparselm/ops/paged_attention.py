"""Decode attention over a paged KV cache: one query per sequence, every sequence and head of a batch in one call.

The serving engine's decoding sequences each attend one new query over their own keys, which lie in blocks of a
shared pool. PyTorch's CPU attention kernel does that one sequence per call and reads bf16 keys ~4x slower than
fp32 ones, so the cache had to be fp32 and the step made one call per sequence and layer. The C++ kernel in
``paged_attention.cpp`` reads each sequence's keys and values where they lie, block by block through its block
table, in bf16 or fp32, converts them to fp32 in registers and computes scores, softmax and the weighted sum in
fp32, all sequences and heads in one call spread over torch's intra-op threads: memory-bound, each key read once
(docs/benchmarks.md, "Decode attention kernel", has the measurements).

The kernel is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja; ~10 s, then
cached). Where it cannot be built, ``kernel_available`` says why and callers keep PyTorch's attention.
``SPARSELM_PAGED_ATTENTION=off`` turns it off (to compare).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("paged_attention.cpp")


def _build_flags() -> tuple[str, list[str]]:
    """(name suffix, compiler flags): AVX2 code on x86 CPUs that have it, portable code elsewhere. The suffix keeps
    builds for different flags apart in torch's extension cache (the same home directory may see other CPUs)."""
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for runs serially in an extension built without it
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", [*flags, "-mavx2", "-mfma"]
    return "generic", flags


@functools.cache
def _load() -> str | None:
    """Build and load the kernel once per process; None if loaded, else why it could not be."""
    if os.environ.get("SPARSELM_PAGED_ATTENTION", "").lower() in ("0", "off", "false", "no"):
        return "turned off by SPARSELM_PAGED_ATTENTION"
    try:
        from torch.utils import cpp_extension

        venv_bin = str(Path(sys.executable).parent)  # the `ninja` package's binary, in a venv not on PATH
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        suffix, flags = _build_flags()
        cpp_extension.load(
            name=f"sparselm_paged_attention_{suffix}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: all mean "use PyTorch's attention"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the C++ kernel could not be built ({first_line})"
    return None


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
