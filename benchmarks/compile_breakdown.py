"""What ``torch.compile`` compiles in a training step and where the step's time goes, eager against compiled.

Builds the rows of ``benchmarks/train.py``'s nanoGPT-shaped case (sparselm's dense d512 model with
``train.compile`` off and on, the nanoGPT-style step eager and under ``torch.compile``), runs two warm-up steps of
each (compiling them), then reports per model:
- what dynamo did: graph breaks (with their reasons), frames compiled, distinct graphs (sparselm compiles each
  block: one graph serving every block means no recompiles per block);
- one step under ``torch.profiler`` (inductor's kernels recorded one by one), split into matmuls, attention
  kernels, the fused kernels inductor generated, the loss's work besides its matmuls (sparselm's chunked
  ``linear_cross_entropy``, the plain ``cross_entropy`` and its backward), the optimizer, copies/casts and the rest;
  and how much of the step ran inside compiled graphs (their kernels and the matmuls/attention they call); the
  slowest fused kernels by name.

One profiled step is a snapshot, not a timing: ``benchmarks/train.py`` measures throughput in interleaved rounds.

    python benchmarks/compile_breakdown.py [--json] [--shape 512,8,512,32000] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
import torch._dynamo.utils as dynamo_utils
import torch._inductor.config as inductor_config

from train import _shape, build, op_kind

CATEGORIES = ("matmul", "attention", "fused", "loss", "optimizer", "copy", "other")
LOSS_SCOPES = ("_LinearCrossEntropy", "aten::cross_entropy_loss", "LogSoftmaxBackward0", "NllLossBackward0")
COMPILED_SCOPES = ("CompiledFunction", "CompiledFunctionBackward", "## Call CompiledFxGraph")


def dynamo_summary(before: dict, after: dict) -> dict:
    """Dynamo's counters accumulated between two snapshots: graph breaks by reason, frames, distinct graphs."""
    breaks = Counter(after.get("graph_break", {})) - Counter(before.get("graph_break", {}))
    stats = Counter(after.get("stats", {})) - Counter(before.get("stats", {}))
    frames = Counter(after.get("frames", {})) - Counter(before.get("frames", {}))
    return {
        "graph_breaks": sum(breaks.values()),
        "break_reasons": dict(breaks),
        "frames_compiled": frames.get("ok", 0),
        "unique_graphs": stats.get("unique_graphs", 0),
        "calls_captured": stats.get("calls_captured", 0),
    }


def snapshot() -> dict:
    return {k: dict(v) for k, v in dynamo_utils.counters.items()}


def _ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def category(event, ancestors: list[str]) -> str:
    """train.py's operator categories, with inductor's kernels, the loss and the optimizer split out of copy/other."""
    name, kind = event.name, op_kind(event.name)
    if kind in ("matmul", "attention"):
        return kind
    if "cpp_fused" in name or name.startswith("## Call CompiledFxGraph"):
        return "fused"
    if any(a.endswith(LOSS_SCOPES) for a in [name, *ancestors]):
        return "loss"
    if any(a.startswith("Optimizer.") for a in [name, *ancestors]):
        return "optimizer"
    return kind


def profile_breakdown(step) -> dict:
    """One step's self CPU time (ms) by category, and the part spent inside compiled graphs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ms = dict.fromkeys(CATEGORIES, 0.0)
    compiled = 0.0
    kernels: Counter[str] = Counter()
    for event in prof.events():
        ancestors = _ancestors(event)
        self_ms = event.self_cpu_time_total / 1e3
        kind = category(event, ancestors)
        ms[kind] += self_ms
        if kind == "fused":
            kernels[event.name] += self_ms
        if any(a.startswith(COMPILED_SCOPES) for a in [event.name, *ancestors]):
            compiled += self_ms
    total = sum(ms.values())
    top = {name: round(t, 1) for name, t in kernels.most_common(6)}
    return {"total_ms": total, "ms": ms, "inside_compiled_ms": compiled, "top_fused_ms": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", type=_shape, default=[512, 8, 512, 32000], help="d_model,n_layers,context,vocab")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inductor_config.cpp.enable_kernel_profile = True  # inductor's kernels show up in the profile by name
    runners, _ = build(argparse.Namespace(shape=args.shape, cases="shape", compile=True), args.precision)
    for runner in runners:
        before = snapshot()
        for _ in range(2):
            runner.step()
        row = {"model": runner.name, "precision": args.precision, **dynamo_summary(before, snapshot())}
        row.update(profile_breakdown(runner.step))
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(format_row(row), flush=True)


def format_row(row: dict) -> str:
    total = row["total_ms"] or 1.0
    parts = ", ".join(f"{k} {v:,.0f} ({v / total * 100:.0f}%)" for k, v in row["ms"].items())
    reasons = "; ".join(f"{n} x {r}" for r, n in row["break_reasons"].items()) or "-"
    return (
        f"{row['model']} [{row['precision']}]: one step {total:,.0f} ms of CPU time: {parts}; inside compiled "
        f"graphs {row['inside_compiled_ms'] / total * 100:.0f}%. dynamo: {row['frames_compiled']} frames, "
        f"{row['unique_graphs']} graphs, {row['graph_breaks']} graph breaks ({reasons})"
    )


if __name__ == "__main__":
    main()
