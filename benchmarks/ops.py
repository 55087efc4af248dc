"""Micro-benchmarks of the ops in ``sparselm.ops``, one per op: the MoE ops at the MoE-layer benchmark's shape and
the chunked output layer + cross-entropy at the training benchmark's (nanoGPT's) shape.

Each op is timed alone, forward + backward where it has one: ``permute`` (sort by expert, dropless and with a
capacity), ``dispatch`` and ``combine`` (gathers), and the expert FFN kernels: ``ExpertLoop`` with its default
settings, without the thread-group split (every GEMM on all threads), without gradient-buffer recycling, with a new
routing at every call as in training (with and without its rows padded for oneDNN), and ``grouped_experts`` and
``padded_experts``. Tokens are routed top-k by a random router (about T*k/E rows per expert).
Then the expert kernels for inference (forward only, under ``torch.inference_mode``, weights held in the row's dtype
as a serving engine holds them) at a few token counts (``--inference-tokens``): the loop against the padded kernel,
with the kernel ``Experts`` would pick (``prefer_padded``). Then
``linear_cross_entropy`` against the plain ``F.cross_entropy(F.linear(x, W).float(), y)`` it replaces (4,096 tokens,
d_model 512, vocabulary 32,000 by default), with its peak memory (the largest resident-set growth over one step,
measured in a fresh process). All ops of one dtype are timed in interleaved rounds (A, B, C, A, B, C, ...) after one
warm-up each; medians in ms. ``bf16`` = activations in bf16 over fp32 master weights (what autocast training hands
the kernels).

    python benchmarks/ops.py [--json] [--experts 64] [--top-k 2] [--tokens 8192] [--inference-tokens 1,16,64,512]
        [--repeats 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memory import peak_rss_mb, reset_peak_rss, rss_mb
from moe_layer import cpu_name, time_interleaved
from sparselm.ops import (
    ExpertLoop,
    ExpertLoopSettings,
    combine,
    dispatch,
    grouped_experts,
    linear_cross_entropy,
    padded_experts,
    permute,
    prefer_padded,
)
from sparselm.precision import bf16_is_fast, cpu_speeds_sentence

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- ops:start -->", "<!-- ops:end -->"


def expert_steps(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One step per op: name -> a callable running it (forward and backward where the op has a backward)."""
    gen = torch.Generator().manual_seed(0)
    t, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    experts = torch.randn(t, e, generator=gen).topk(k, dim=-1).indices
    counts = torch.bincount(experts.flatten(), minlength=e)
    gate_weights = torch.rand(t, k, generator=gen)
    capacity = int(1.25 * t * k / e)
    perm = permute(experts, counts)
    m = perm.order.numel()
    weights = [nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in ((e, d, f), (e, d, f), (e, f, d))]
    w_up, w_gate, w_down = weights
    x = torch.randn(t, d, generator=gen).to(dtype).requires_grad_(True)
    rows = torch.randn(m, d, generator=gen).to(dtype).requires_grad_(True)
    gates = perm.rows_of(gate_weights).requires_grad_(True)
    up_rows = torch.randn(m, d, generator=gen).to(dtype)
    up_tokens = torch.randn(t, d, generator=gen).to(dtype)

    def clear() -> None:
        for tensor in (*weights, x, rows, gates):
            tensor.grad = None

    def ffn(kernel: Callable) -> Callable[[], None]:
        def step() -> None:
            clear()
            kernel(rows, gates, perm.counts, w_up, w_gate, w_down, None, None).backward(up_rows)

        return step

    # Training re-routes at every step, so every expert's row count is new at every call (oneDNN compiles a bf16
    # GEMM kernel per shape): a fresh routing of the same tokens per call, never repeated within a run.
    routings = iter(
        [
            torch.bincount(torch.randn(t, e, generator=gen).topk(k, dim=-1).indices.flatten(), minlength=e)
            for _ in range(2 * (args.repeats + 1))  # two rows, a warm-up and the rounds each
        ]
    )

    def ffn_rerouted(kernel: Callable) -> Callable[[], None]:
        def step() -> None:
            clear()
            kernel(rows, gates, next(routings), w_up, w_gate, w_down, None, None).backward(up_rows)

        return step

    def dispatch_step() -> None:
        clear()
        dispatch(x, perm).backward(up_rows)

    def combine_step() -> None:
        clear()
        combine(rows, perm).backward(up_tokens)

    return {
        "permute (dropless)": lambda: permute(experts, counts),
        "permute (capacity 1.25)": lambda: permute(experts, counts, capacity),
        "dispatch": dispatch_step,
        "combine": combine_step,
        "expert_loop (default settings)": ffn(ExpertLoop(ExpertLoopSettings())),
        "expert_loop, threads=1 (no split)": ffn(ExpertLoop(ExpertLoopSettings(threads=1))),
        "expert_loop, reuse_grad_buffers=False": ffn(ExpertLoop(ExpertLoopSettings(reuse_grad_buffers=False))),
        "expert_loop, new routing at every call": ffn_rerouted(ExpertLoop(ExpertLoopSettings())),
        "expert_loop, align_rows=1, new routing at every call": ffn_rerouted(
            ExpertLoop(ExpertLoopSettings(align_rows=1))
        ),
        "grouped_experts (grouped_mm)": ffn(grouped_experts),
        "padded_experts (plain autograd)": ffn(padded_experts),
    }


def inference_steps(args: argparse.Namespace, dtype: torch.dtype, tokens: int) -> dict[str, Callable[[], None]]:
    """The expert FFN forward at ``tokens`` tokens without autograd, weights in ``dtype``: loop and padded."""
    gen = torch.Generator().manual_seed(1)
    d, f, e, k = args.d_model, args.d_ff, args.experts, args.top_k
    experts = torch.randn(tokens, e, generator=gen).topk(k, dim=-1).indices
    perm = permute(experts, torch.bincount(experts.flatten(), minlength=e))
    weights = [(torch.randn(*s, generator=gen) * 0.02).to(dtype) for s in ((e, d, f), (e, d, f), (e, f, d))]
    rows = torch.randn(perm.order.numel(), d, generator=gen).to(dtype)
    gates = perm.rows_of(torch.rand(tokens, k, generator=gen))
    picked = "padded" if prefer_padded(perm.counts.tolist(), dtype, d * f) else "loop"  # as Experts.kernel_for asks
    loop = ExpertLoop(ExpertLoopSettings())

    def step(kernel: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                kernel(rows, gates, perm.counts, *weights, None, None)

        return run

    return {
        f"expert_loop, inference, {tokens} tokens": step(loop),
        f"padded_experts, inference, {tokens} tokens (auto picks {picked})": step(padded_experts),
    }


CE_REFERENCE = "linear + cross_entropy (plain)"


def cross_entropy_steps(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """The output layer + loss, plain and chunked: x [tokens, d] (fp32, as the residual stream is), W [V, d] fp32
    master weights, autocast when ``dtype`` is bf16; forward + backward of the mean loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.ce_tokens, args.d_model, generator=gen).requires_grad_(True)
    w = nn.Parameter(torch.randn(args.vocab, args.d_model, generator=gen) * 0.02)
    y = torch.randint(0, args.vocab, (args.ce_tokens,), generator=gen)
    bf16 = dtype == torch.bfloat16

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = w.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn()
            loss.backward()

        return run

    return {
        CE_REFERENCE: step(lambda: F.cross_entropy(F.linear(x, w).float(), y)),
        "linear_cross_entropy (chunked)": step(lambda: linear_cross_entropy(x, w, y)),
    }


def format_table(rows: list[dict], args: argparse.Namespace, note: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    lines = [
        f"Measured {when} UTC on {cpu_name()} ({os.cpu_count()} CPUs), {args.threads} threads, torch "
        f"{torch.__version__}. {args.tokens:,} tokens, top-{args.top_k} of {args.experts} experts, d_model "
        f"{args.d_model}, expert d_ff {args.d_ff} (SwiGLU, no bias). Median of {args.repeats} interleaved runs, ms; "
        "forward + backward except `permute` and the inference rows (forward only, no autograd, weights in the "
        "row's dtype, at the token count named). 1-minute load average at the end "
        f"{os.getloadavg()[0]:.2f} (2 cores: above ~0.2 beyond this run is someone else's work).",
        "",
        "| op | dtype | ms | fastest run ms | / reference | reference |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['vs_reference']:.2f}" if r.get("vs_reference") is not None else "-"
        ref = r.get("reference") or "-"
        lines.append(f"| {r['op']} | {r['dtype']} | {r['ms']:,.2f} | {r['ms_min']:,.2f} | {ratio} | {ref} |")
    ce = [r for r in rows if "peak_mb" in r]
    if ce:
        lines += [
            "",
            f"Output layer + loss at {args.ce_tokens:,} tokens, d_model {args.d_model}, vocabulary "
            f"{args.vocab:,}: peak memory of one step (resident-set growth, fresh process):",
            "",
        ]
        lines += [f"- {r['op']} ({r['dtype']}): {r['peak_mb']:,.0f} MB" for r in ce]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def write_docs(table: str) -> None:
    text = DOCS.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## MoE ops (`benchmarks/ops.py`)\n\n" + block + "\n"
    DOCS.write_text(text)


def _peak_memory(args: argparse.Namespace) -> float:
    """MB by which one step of the op named in ``--peak-memory-of`` (after a warm-up step) raised the peak RSS."""
    op, dtype = args.peak_memory_of.rsplit("/", 1)
    step = cross_entropy_steps(args, torch.float32 if dtype == "fp32" else torch.bfloat16)[op]
    step()
    before = rss_mb()
    reset_peak_rss()
    step()
    return peak_rss_mb() - before


def _peak_memory_in_child(op: str, dtype: str) -> float:
    """Peak memory of one step measured in a fresh process (this one's peak already holds every other op's)."""
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--write-docs")]
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--peak-memory-of", f"{op}/{dtype}"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object per row (and no table)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--inference-tokens", default="1,16,64,512", help="token counts of the inference rows ('': none)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--dtypes", default="", help="fp32,bf16 (default: both where this CPU computes bf16 natively)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-wait", action="store_true", help="do not wait for idle CPUs before each timed step")
    ap.add_argument("--ce-tokens", type=int, default=4096, help="tokens for the output layer + loss")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the output layer (0: skip it)")
    ap.add_argument("--peak-memory-of", default="", help=argparse.SUPPRESS)  # OP/DTYPE, run in a child process
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(REPO)}")
    args = ap.parse_args()
    note = ""
    if args.dtypes:
        dtypes = [d for d in args.dtypes.split(",") if d]
        if not dtypes or set(dtypes) - {"fp32", "bf16"}:
            ap.error(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
    elif bf16_is_fast(torch.device("cpu")):
        dtypes = ["fp32", "bf16"]
    else:
        dtypes = ["fp32"]
        note = f"bf16 rows skipped: {cpu_speeds_sentence()} (emulated). `--dtypes fp32,bf16` times them anyway."
    torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        print(json.dumps({"peak_mb": _peak_memory(args)}))
        return
    rows = []
    loop_reference = "expert_loop (default settings)"
    for name in dtypes:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        groups = [(expert_steps(args, dtype), loop_reference, ("expert_loop", "grouped", "padded"))]
        for tokens in [int(t) for t in args.inference_tokens.split(",") if t]:
            steps = inference_steps(args, dtype, tokens)
            groups.append((steps, next(iter(steps)), ("expert_loop", "padded")))
        if args.vocab:
            groups.append((cross_entropy_steps(args, dtype), CE_REFERENCE, ("linear",)))
        for steps, reference, compared in groups:
            times, _ = time_interleaved(steps, args.repeats, not args.no_wait)
            ref_ms = statistics.median(times[reference])
            for op, ms in times.items():
                row = {"op": op, "dtype": name, "ms": statistics.median(ms), "ms_min": min(ms)}
                if op.startswith(compared):
                    row |= {"vs_reference": row["ms"] / ref_ms, "reference": reference}
                if reference == CE_REFERENCE:
                    row |= {"tokens": args.ce_tokens, "vocab": args.vocab, "d_model": args.d_model}
                    row["peak_mb"] = _peak_memory_in_child(op, name)
                elif ", inference, " in op:
                    row |= {"tokens": int(op.split(", inference, ")[1].split()[0]), "inference": True}
                    row |= {"experts": args.experts, "top_k": args.top_k}
                else:
                    row |= {"tokens": args.tokens, "experts": args.experts, "top_k": args.top_k}
                row["repeats"] = args.repeats
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    table = format_table(rows, args, note)
    if not args.json:
        print(table)
    if args.write_docs:
        write_docs(table)


if __name__ == "__main__":
    main()
