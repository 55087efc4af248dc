"""Which compute precision a run uses: bf16 autocast where the hardware computes in bf16, fp32 where it would not.

bf16 autocast is the Gopher recipe and 2.2-2.7x faster than fp32 on a CPU with avx512_bf16. On a CPU without it
torch emulates bf16 matmuls: measured 2026-12-01 on a 2-core AVX2-only EPYC, a 1024 x 1024 matmul ran at 115
GFLOP/s in fp32 and 0.9 GFLOP/s in bf16, and a training step of the default MoE about 50x slower under autocast.
``train.precision = "auto"`` (the default) measures both once per process and takes bf16 only where it is at
least as fast: what matters is which kernels torch dispatches to here, which CPU flags only approximate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from sparselm.config import PRECISIONS
from sparselm.errors import InputError


@functools.cache
def cpu_matmul_speeds() -> tuple[float, float]:
    """(fp32, bf16) matmul FLOP/s of this CPU at the current thread count, from a brief 256 x 256 measurement
    (about 0.1 s where bf16 is fast, 0.3 s where it is emulated)."""
    from sparselm.train.metrics import measure_peak_flops

    return measure_peak_flops(torch.float32, 256, 0.05), measure_peak_flops(torch.bfloat16, 256, 0.05)


def cpu_speeds_sentence() -> str:
    """What the bf16-versus-fp32 decision rests on, for warnings and benchmark notes."""
    fp32, bf16 = cpu_matmul_speeds()
    return f"bf16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s on this CPU against {fp32 / 1e9:.0f} in fp32"


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        fp32, bf16 = cpu_matmul_speeds()
        return bf16 >= fp32
    return False


def resolve_precision(requested: str, device: torch.device, warn: Callable[[str], None] | None = None) -> str:
    """``requested`` (auto | bf16 | fp32) -> the precision to compute in (bf16 | fp32). An explicit bf16 is kept
    but ``warn`` is told when it will be slow, so that a config written for a GPU still means what it says."""
    if requested not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    fast = bf16_is_fast(device)
    if requested == "auto":
        return "bf16" if fast else "fp32"
    if not fast and warn is not None:
        speeds = cpu_speeds_sentence() if device.type == "cpu" else f"this {device.type} device has no fast bf16"
        warn(f"precision bf16: {speeds}, so training will be slow; precision auto (or fp32) computes in fp32 here")
    return "bf16"
