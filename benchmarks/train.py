"""Training throughput, MFU, profile shares and peak memory of whole models, side by side with a nanoGPT-style step.

Runs full optimizer steps (forward, backward, clip, AdamW) exactly as ``sparselm train`` does, on random tokens
(throughput does not depend on the text). Configs: the default MoE and its dense base (configs/default.toml,
configs/dense.toml) and a dense model of nanoGPT's shape (d_model 512, 8 layers, 8 heads, context 512, vocabulary
32k, batch 8; ``--shape`` changes it), next to ``nanogpt_baseline.py``'s GPT of the same shape, batch and precision.

All models of one precision are built in one process and timed in interleaved rounds (A, B, C, D, A, B, ...) after
a warm-up, so load from other processes hits each alike; every ratio is the median of the per-round ratios, with its
range. MFU = tokens/s x training FLOPs per token / the bf16 or fp32 matmul rate measured here (2048^2, same thread
count; the best of a measurement before and after the rounds); FLOPs count 6 per matmul weight and attention
causally (half the square: ``6 * 2 * layers * context * d_model`` per token). One extra step per model runs under
``torch.profiler``: the shares of its CPU time in matmuls, attention kernels, copies/casts and everything else.
Memory = what one model's training holds beyond its built model, in a fresh process (Linux): the peak RSS during its
second step (the first allocates AdamW's state, and compiles) over the RSS before its first.

Every row runs under the host-memory policy ``sparselm train`` sets (``train.keep_freed_memory``, on by default:
glibc keeps freed memory for the next step, sparselm.host_memory); ``--allocator default`` times glibc's own
policy instead. Both models of a pair share the process, so they share the policy.

    python benchmarks/train.py [--json] [--quick] [--compile] [--allocator keep|default] [--write-docs]
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memory import add_allocator_argument, apply_allocator, peak_rss_mb, reset_peak_rss, rss_mb
from moe_layer import cpu_name, wait_for_idle
from nanogpt_baseline import training_step
from sparselm.config import Config, apply_overrides, load_config
from sparselm.parallel.runtime import Runtime
from sparselm.params.counting import count_params, flops_per_token
from sparselm.precision import bf16_is_fast, cpu_speeds_sentence, measure_matmul_flops
from sparselm.train.trainer import build_model, forward_backward

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- train:start -->", "<!-- train:end -->"
NANOGPT = "nanoGPT-style"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to"}


@dataclass
class Runner:
    name: str
    step: Callable[[], None]
    tokens: int  # per step
    train_flops: float  # per token, attention counted causally
    total_params: int
    active_params: int
    times: list[float] = field(default_factory=list)  # ms


def sparselm_runner(name: str, cfg: Config) -> Runner:
    torch.manual_seed(0)
    runtime = Runtime(cfg, torch.device("cpu"))
    model = runtime.parallelize(build_model(cfg))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    t = cfg.train
    micro = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    shape = (t.global_batch_size, cfg.data.seq_len)
    x, y = (torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in "xy")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, cfg, x, y, micro, runtime)
        runtime.reduce_and_clip_gradients(model, cfg.optim.grad_clip)
        optimizer.step()

    counts = count_params(cfg)
    return Runner(name, step, x.numel(), flops_per_token(cfg).train_causal, counts.total, counts.active)


def nanogpt_runner(name: str, cfg: Config, precision: str, compile: bool) -> Runner:
    m, seq = cfg.model, cfg.data.seq_len
    model, train_step = training_step(m.vocab_size, m.d_model, m.n_layers, m.n_heads, seq, precision, compile)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, m.vocab_size, (cfg.train.global_batch_size, seq), generator=gen) for _ in "xy")
    params = sum(p.numel() for p in model.parameters())
    non_embedding_matmul = m.n_layers * 12 * m.d_model**2  # q/k/v/o 4 d^2, MLP 8 d^2
    forward = 2 * (non_embedding_matmul + m.vocab_size * m.d_model) + 2 * m.n_layers * seq * m.d_model
    return Runner(name, lambda: train_step(x, y), x.numel(), 3 * forward, params, params)


def build(args: argparse.Namespace, precision: str) -> tuple[list[Runner], list[tuple[str, str]]]:
    """The runners of one precision and the pairs (faster-hoped, reference) whose per-round ratios are reported:
    the nanoGPT-shaped sparselm model against the nanoGPT-style step, the default MoE against its dense base."""
    d, layers, ctx, vocab = args.shape
    shape = [
        f"model.vocab_size={vocab}",
        f"model.d_model={d}",
        f"model.n_layers={layers}",
        f"model.n_heads={max(1, d // 64)}",
        f"model.d_ff={round(8 * d / 3 / 64) * 64}",  # SwiGLU with the parameters of a 4x GELU FFN
        f"model.max_seq_len={ctx}",
        f"data.seq_len={ctx}",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
    ]
    known = {
        "default-moe": ("configs/default.toml", []),
        "default-dense": ("configs/dense.toml", []),
        "shape": ("configs/dense.toml", shape),
    }
    chosen = args.cases.split(",")
    runners, pairs = [], []
    for case in chosen:
        if case not in known:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(known)}")
        path, overrides = known[case]
        for compiled in [False, True] if args.compile else [False]:
            extra = [f"train.precision={precision}", f"train.compile={str(compiled).lower()}"]
            cfg = apply_overrides(load_config(REPO / path), [*overrides, *extra])
            suffix = " (compiled)" if compiled else ""
            name = (f"dense-d{d}-l{layers}-ctx{ctx}" if case == "shape" else case) + suffix
            runners.append(sparselm_runner(name, cfg))
            if case == "shape":
                runners.append(nanogpt_runner(f"{NANOGPT} d{d}-l{layers}-ctx{ctx}{suffix}", cfg, precision, compiled))
                pairs.append((name, runners[-1].name))
            if case == "default-moe" and "default-dense" in chosen:
                pairs.append((name, "default-dense" + suffix))
    return runners, pairs


def time_rounds(runners: list[Runner], rounds: int, warmup: int, wait: bool) -> None:
    for r in runners:
        for _ in range(warmup):
            r.step()
    for _ in range(rounds):
        for r in runners:
            wait_for_idle(wait)
            start = time.perf_counter()
            r.step()
            r.times.append((time.perf_counter() - start) * 1e3)


def _step_memory(args: argparse.Namespace) -> float:
    """MB: the peak RSS during the second step of the model named in ``--memory-of`` over the RSS before its first
    step, the other models of its precision built and idle (so that none of their memory is freed for its use)."""
    runners, _ = build(args, args.precisions)
    runner = next(r for r in runners if r.name == args.memory_of)
    before = rss_mb()
    runner.step()
    reset_peak_rss()
    runner.step()
    return peak_rss_mb() - before


def _step_memory_in_child(name: str, precision: str) -> float:
    """``_step_memory`` in a fresh process: this one's memory already holds every other model's steps."""
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--write-docs")]
    argv += ["--memory-of", name, "--precisions", precision]
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_memory_mb"]


def op_kind(name: str) -> str:
    """The profile category of one operator: matmul, attention, copy (casts) or other."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or name.startswith("sparselm_causal::"):
        return "attention"
    return "copy" if name in COPY_OPS else "other"


def profile_shares(step: Callable[[], None]) -> dict[str, float]:
    """Shares of one step's self CPU time: matmul, attention, copy (casts), other."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    kinds = {"matmul": 0.0, "attention": 0.0, "copy": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kinds[op_kind(event.key)] += event.self_cpu_time_total
    total = sum(kinds.values()) or 1.0
    return {k: v / total for k, v in kinds.items()}


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and range of per-round ratios num[i] / den[i] (same round: the same load on the machine)."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--quick", action="store_true", help="1 warm-up step and 2 rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="default-moe,default-dense,shape", help="default-moe, default-dense, shape")
    ap.add_argument("--shape", type=_shape, default=[512, 8, 512, 32000], help="d_model,n_layers,context,vocab")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (train.compile / torch.compile)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for idle CPUs before each timed step")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    ap.add_argument(
        "--precisions", default="", help="fp32,bf16 (default: both where this CPU computes bf16 natively, else fp32)"
    )
    add_allocator_argument(ap)
    ap.add_argument("--memory-of", default="", help=argparse.SUPPRESS)  # a runner's name, in a child process
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(REPO)}")
    args = ap.parse_args()
    allocator = apply_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"step_memory_mb": _step_memory(args)}))
        return
    rounds, warmup = (2, 1) if args.quick else (args.rounds, 2)
    precisions, skipped = _precisions(args.precisions)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows, ratios = [], []
    for precision in precisions:
        peak = measure_matmul_flops(dtypes[precision], 2048, 2.0)
        runners, pairs = build(args, precision)
        time_rounds(runners, rounds, warmup, not args.no_wait)
        peak = max(peak, measure_matmul_flops(dtypes[precision], 2048, 2.0))
        by_name = {r.name: r for r in runners}
        for r in runners:
            ms = statistics.median(r.times)
            tps = r.tokens / (ms / 1e3)
            row = {
                "config": r.name,
                "precision": precision,
                "total_params": r.total_params,
                "active_params": r.active_params,
                "train_flops_per_token": r.train_flops,
                "step_ms": ms,
                "tokens_per_sec": tps,
                "mfu": tps * r.train_flops / peak,
                "peak_gflops": peak / 1e9,
                "step_memory_mb": _step_memory_in_child(r.name, precision),
                "rounds": len(r.times),
            }
            if not args.no_profile:
                row["profile"] = profile_shares(r.step)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        for fast, slow in pairs:  # tokens per step are equal within a pair: ratio of step times of one round
            stats = ratio_stats(by_name[slow].times, by_name[fast].times)
            ratio = {"ratio": f"{fast} / {slow}", "precision": precision, "tokens_per_sec_ratio": stats}
            ratios.append(ratio)
            if args.json:
                print(json.dumps(ratio), flush=True)
        del runners, by_name
    table = format_table(rows, ratios, args.threads, allocator)
    if skipped:
        table += f"\n\n{skipped}"
    if not args.json:
        print(table)
    if args.write_docs:
        write_docs(table)


def _shape(text: str) -> list[int]:
    """``--shape`` of the nanoGPT-shaped case: four positive integers d_model,n_layers,context,vocab."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) <= 0 or values[0] % 64:
        want = "d_model,n_layers,context,vocab (positive, d_model a multiple of 64)"
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return values


def _precisions(requested: str) -> tuple[list[str], str]:
    """The precisions to time and, when bf16 is left out by default, the sentence that says why: where bf16 is
    emulated (no avx512_bf16/AMX) a bf16 step takes minutes and times the emulation, not the model."""
    if requested:
        chosen = [p.strip() for p in requested.split(",") if p.strip()]
        if not chosen or set(chosen) - {"fp32", "bf16"}:
            raise SystemExit(f"--precisions takes fp32 and/or bf16, got {requested!r}")
        return chosen, ""
    if bf16_is_fast(torch.device("cpu")):
        return ["fp32", "bf16"], ""
    return ["fp32"], (
        f"bf16 rows skipped: {cpu_speeds_sentence()} (emulated; `sparselm train` computes in fp32 here). "
        "`--precisions fp32,bf16` times them anyway."
    )


def format_table(rows: list[dict], ratios: list[dict], threads: int, allocator: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {cpu_name()} ({cpu_flags()}), "
        f"{threads} threads, torch {torch.__version__}; 1-minute load average {os.getloadavg()[0]:.1f} at the end "
        "(2 cores: above ~2 other jobs shared them). Median step of interleaved rounds; MFU against the matmul rate "
        "measured here (`peak`), attention FLOPs counted causally; profile = shares of one step's CPU time in "
        "matmul / attention / copies and casts / other; memory = a fresh process's peak RSS during the model's second "
        f"step over its RSS before the first (AdamW's state included). Host memory, every row: {allocator}.",
        "",
        "| config | precision | params | step ms | tokens/s | MFU | peak GFLOP/s | profile mm/attn/copy/other "
        "| memory MB |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        prof = r.get("profile")
        shares = "/".join(f"{prof[k] * 100:.0f}" for k in ("matmul", "attention", "copy", "other")) if prof else "-"
        lines.append(
            f"| {r['config']} | {r['precision']} | {r['total_params'] / 1e6:.1f}M | {r['step_ms']:,.0f} "
            f"| {r['tokens_per_sec']:,.0f} | {r['mfu'] * 100:.1f}% | {r['peak_gflops']:.0f} | {shares} "
            f"| {r['step_memory_mb']:,.0f} |"
        )
    if ratios:
        lines += ["", "| tokens/s ratio (per-round median, range) | precision | ratio |", "|---|---|---:|"]
        for q in ratios:
            s = q["tokens_per_sec_ratio"]
            lines.append(f"| {q['ratio']} | {q['precision']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    return "\n".join(lines)


def write_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{START}\n{table}\n{END}"
    if START in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Training throughput (`benchmarks/train.py`)\n\n" + block + "\n"
    DOCS.write_text(text)


if __name__ == "__main__":
    main()
