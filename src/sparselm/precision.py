"""Compute precision: which one this hardware runs fast, and the one autocast context every caller uses.

``auto`` computes in bf16 autocast (fp32 master weights, the Gopher recipe) where the device multiplies bf16
matrices at least as fast as fp32, and in fp32 where it does not (CPUs without native bf16 emulate it, far slower
than fp32: docs/benchmarks.md has the figures). What decides is which kernels torch dispatches to on this machine,
which CPU flags only approximate, so on a CPU the two speeds are measured once per process.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch

from sparselm.config import PRECISIONS
from sparselm.errors import InputError


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Attainable square-matmul FLOP/s of this device at the current thread count (the denominator of MFU)."""
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG: training determinism depends on it
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


@functools.cache
def cpu_matmul_speeds() -> tuple[float, float]:
    """(fp32, bf16) matmul FLOP/s of this CPU at the current thread count: the best of three interleaved 256 x 256
    measurements per dtype (0.2-0.4 s in all), so that another process's load on a shared machine, which lowers
    some windows, does not decide the precision."""
    best = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for _ in range(3):
        for dtype in best:
            best[dtype] = max(best[dtype], measure_matmul_flops(dtype, 256, 0.03))
    return best[torch.float32], best[torch.bfloat16]


def cpu_speeds_sentence(speeds: tuple[float, float] | None = None) -> str:
    """What the bf16-versus-fp32 decision rests on, for warnings and benchmark notes."""
    fp32, bf16 = speeds or cpu_matmul_speeds()
    return f"bf16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s on this CPU against {fp32 / 1e9:.0f} in fp32"


def bf16_is_fast(device: torch.device, speeds: tuple[float, float] | None = None) -> bool:
    """``speeds`` (fp32, bf16) FLOP/s stand in for this CPU's own measurement (to reason about another machine)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        fp32, bf16 = speeds or cpu_matmul_speeds()
        return bf16 >= fp32
    return False


def resolve_precision(
    requested: str,
    device: torch.device,
    warn: Callable[[str], None] | None = None,
    speeds: tuple[float, float] | None = None,
) -> str:
    """``requested`` (auto | bf16 | fp32) -> the precision to compute in (bf16 | fp32). An explicit bf16 is kept
    but ``warn`` is told when it will be slow, so that a config written for a GPU still means what it says."""
    if requested not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    fast = bf16_is_fast(device, speeds)
    if requested == "auto":
        return "bf16" if fast else "fp32"
    if not fast and warn is not None:
        why = cpu_speeds_sentence(speeds) if device.type == "cpu" else f"this {device.type} device has no fast bf16"
        warn(f"precision bf16: {why}, so training will be slow; precision auto (or fp32) computes in fp32 here")
    return "bf16"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context every forward runs under: bf16 autocast or nothing. ``precision`` may still be ``auto``."""
    device = torch.device(device)
    if precision == "auto":
        precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return contextlib.nullcontext()


def kv_cache_dtype(
    weights: torch.dtype, device: torch.device, setting: str = "auto", paged_kernel: bool = False
) -> torch.dtype:
    """A decoding KV cache's dtype: ``setting`` bf16 or fp32, or ``auto``: the weights' dtype, except fp32 on a CPU
    whose decoding queries go through PyTorch's attention kernel (not ``paged_kernel``, sparselm's own): it attends
    one query over bf16 keys ~4x slower than over fp32 ones, and decoding is mostly such calls (docs/serving.md,
    "Decode attention and the KV cache dtype"); attention then casts the bf16 queries to fp32."""
    if setting == "auto":
        return torch.float32 if device.type == "cpu" and not paged_kernel else weights
    return torch.bfloat16 if setting == "bf16" else torch.float32
