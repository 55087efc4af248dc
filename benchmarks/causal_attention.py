"""Causal self-attention of a bf16 training step, forward and backward: PyTorch's CPU kernel
(``scaled_dot_product_attention(is_causal=True)``, flash attention on CPU) against ``sparselm.ops.causal_attention``.

Each row is one layer's attention at a training shape: the d512 model of benchmarks/train.py (batch 8, 8 heads,
context 512, head 64) and the default model (batch 16, 4 heads, context 256, head 64), plus longer contexts.
The two run in interleaved rounds on the same inputs (as the model makes them: transposed views of [B, T, H, D]);
times are medians over rounds, the speed-up the median of the per-round ratios with its range. GFLOP/s counts the
causal half of the square: forward 2 products, backward 4 (the recomputed scores not counted), 2 FLOPs per
multiply-add.

    python benchmarks/causal_attention.py [--json] [--shapes 8x8x512x64,16x4x256x64] [--rounds 7] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from parallel_bench import write_docs
from serve import machine, machine_summary
from sparselm.ops import causal_attention as kernel_module


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def timed(fn, inputs, grad) -> tuple[float, float]:
    """(forward ms, backward ms) of one call on fresh leaves."""
    q, k, v = (t.detach().requires_grad_() for t in inputs)
    start = time.perf_counter()
    out = fn(q, k, v)
    middle = time.perf_counter()
    out.backward(grad)
    return (middle - start) * 1e3, (time.perf_counter() - middle) * 1e3


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r}: want BxHxTxD, four positive integers (e.g. 8x8x512x64)")
    return tuple(map(int, parts))  # type: ignore[return-value]


def measure(shape, rounds: int) -> dict:
    b, h, t, d = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, 3, h, d, generator=g).bfloat16()
    inputs = [x[:, :, i].transpose(1, 2) for i in range(3)]
    grad = torch.randn(b, h, t, d, generator=g).bfloat16()
    impls = {"sdpa": sdpa, "kernel": kernel_module.causal_attention}
    for fn in impls.values():
        timed(fn, inputs, grad)  # warm-up: builds, first-touch allocations
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(timed(fn, inputs, grad))
    causal_macs = b * h * d * t * (t + 1) / 2
    row = {"shape": f"{b}x{h}x{t}x{d}"}
    for name, runs in times.items():
        fwd, bwd = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        row |= {f"{name}_fwd_ms": fwd, f"{name}_bwd_ms": bwd, f"{name}_ms": statistics.median(sum(r) for r in runs)}
        row[f"{name}_gflops"] = 2 * 6 * causal_macs / (row[f"{name}_ms"] * 1e6)
    ratios = sorted(sum(s) / sum(k) for s, k in zip(times["sdpa"], times["kernel"], strict=True))
    row |= {"speedup": statistics.median(ratios), "speedup_min": ratios[0], "speedup_max": ratios[-1]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shapes", type=lambda s: [parse_shape(p) for p in s.split(",")],
                    default=[(8, 8, 512, 64), (16, 4, 256, 64), (2, 8, 2048, 64)])  # fmt: skip
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernel_module.kernel_available():
        raise SystemExit(f"the causal-attention kernel is not available: {kernel_module.unavailable_reason()}")
    host = machine()
    rows = []
    for shape in args.shapes:
        rows.append(measure(shape, args.rounds))
        if args.json:
            print(json.dumps(rows[-1]))
    note = (
        f"{machine_summary(host)}, {args.threads} threads, {host['date']}; bf16, {args.rounds} interleaved rounds; "
        f"1-minute load {host['load_before']:.1f} before"
    )
    table = [
        "| B x H x T x head | PyTorch fwd / bwd ms | kernel fwd / bwd ms | PyTorch GFLOP/s | kernel GFLOP/s | "
        "speed-up (range) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    table += [
        f"| {r['shape']} | {r['sdpa_fwd_ms']:.1f} / {r['sdpa_bwd_ms']:.1f} | {r['kernel_fwd_ms']:.1f} / "
        f"{r['kernel_bwd_ms']:.1f} | {r['sdpa_gflops']:.0f} | {r['kernel_gflops']:.0f} | {r['speedup']:.2f}x "
        f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |"
        for r in rows
    ]
    body = "\n".join([note, "", *table])
    if not args.json:
        print(body)
    if args.write_docs:
        cmd = "`python benchmarks/causal_attention.py --write-docs`"
        write_docs("causal-attention", "Training attention kernel (generated)", f"Generated by {cmd}.\n\n{body}")


if __name__ == "__main__":
    main()
