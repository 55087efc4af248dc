"""Few-row matmuls (``sparselm.ops.row_matmul``) against PyTorch's, and what they do to a decode step.

Three tables, every ratio from alternating calls in one process (this VM's speed drifts over minutes):
1. a linear layer, ``F.linear`` against ``linear_rows``, bf16 weights, 1-16 rows, the demo model's and the d512
   model's shapes (weights cycled over 256 MB, more than any L3 here, so that they come from memory as in a decode
   step), and which one ``sparselm.ops.linear`` takes;
2. the expert FFN at the decode of 1-32 tokens (top-2; rows per expert as a fixed-seed routing gives them; copies of
   the layer cycled over 256 MB): the loop kernel, the padded kernel and ``row_experts``, and the one ``Experts``
   "auto" picks;
3. the bare decode forward (one token through the model's contiguous KV cache after a 256-token prompt, bf16) of the
   demo MoE and the d512 MoE with the kernels and with them turned off, on 1 and 2 threads.

    python benchmarks/row_matmul.py [--json] [--repeats 15] [--write-docs] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from parallel_bench import write_docs
from serve import CASES, REPO, machine, machine_summary
from sparselm.config import apply_overrides, load_config
from sparselm.model.moe import Experts
from sparselm.model.transformer import Transformer
from sparselm.ops import default_expert_loop, padded_experts, row_experts, row_matmul
from sparselm.ops.row_matmul import linear_rows, use_rows

POOL_BYTES = 256e6  # weights cycled over more than any L3 here: a decode step reads them from memory (d512: 181 MB)
LINEAR_SHAPES = [(256, 256), (256, 768), (256, 8192), (512, 512), (512, 1408), (512, 8192)]  # (in, out)
EXPERT_SHAPES = [(8, 256, 384), (16, 512, 704)]  # (experts, d_model, d_ff per expert): demo, d512


def alternate(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, the functions called in turn ``repeats`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            took = fn()  # a function may time itself (leaving out its set-up) and return the seconds
            times[name].append(took if isinstance(took, float) else time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def linear_rows_table(args) -> list[dict]:
    out = []
    for d_in, d_out in LINEAR_SHAPES[:2] if args.quick else LINEAR_SHAPES:
        copies = max(2, int((8e6 if args.quick else POOL_BYTES) / (d_in * d_out * 2)))
        weights = [torch.randn(d_out, d_in).bfloat16() for _ in range(copies)]
        for rows in (1, 2, 16) if args.quick else (1, 2, 4, 8, 16):
            x = torch.randn(rows, d_in).bfloat16()
            fns = {"torch": partial(each, F.linear, x, weights), "kernel": partial(each, linear_rows, x, weights)}
            t = {k: v / copies for k, v in alternate(fns, args.repeats).items()}
            with torch.no_grad():
                taken = "kernel" if use_rows(x, weights[0], rows) else "F.linear"
            row = {"table": "linear", "shape": f"{d_in} -> {d_out}", "rows": rows, "taken": taken}
            row |= {"torch_us": t["torch"] * 1e6, "kernel_us": t["kernel"] * 1e6}
            row["gb_per_s"] = d_in * d_out * 2 / t["kernel"] / 1e9
            out.append(row)
            emit(args, row)
    return out


def each(fn, x, weights) -> None:
    for w in weights:
        fn(x, w)


def experts_table(args) -> list[dict]:
    out = []
    for num_experts, d_model, d_ff in EXPERT_SHAPES[:1] if args.quick else EXPERT_SHAPES:
        layer_bytes = 3 * num_experts * d_model * d_ff * 2
        copies = 1 if args.quick else max(1, round(POOL_BYTES / layer_bytes))  # weights from memory, as in a step
        layers = [Experts(num_experts, d_model, d_ff) for _ in range(copies)]
        for weight in (w for layer in layers for w in layer.parameters()):
            torch.nn.init.normal_(weight, std=0.02)  # the module leaves them torch.empty, as the model initialises them
        layers = [layer.bfloat16() for layer in layers]
        kernels = {"loop": default_expert_loop(), "padded": padded_experts, "rows": row_experts}
        for tokens in (1, 4) if args.quick else (1, 2, 4, 8, 16, 24, 32):
            rng = random.Random(tokens)
            counts = [0] * num_experts
            for _ in range(tokens):
                for e in rng.sample(range(num_experts), 2):
                    counts[e] += 1
            c = torch.tensor(counts)
            x = torch.randn(sum(counts), d_model).bfloat16()
            gates = torch.rand(sum(counts)).bfloat16()
            with torch.inference_mode():
                fns = {k: partial(each_layer, fn, x, gates, c, layers) for k, fn in kernels.items()}
                t = {k: v / copies for k, v in alternate(fns, args.repeats).items()}
                auto = layers[0].kernel_for(x, c)
            row = {"table": "experts", "shape": f"{num_experts} x {d_model} x {d_ff}", "tokens": tokens}
            row |= {"busiest": max(counts), **{f"{k}_us": v * 1e6 for k, v in t.items()}, "auto": auto}
            out.append(row)
            emit(args, row)
    return out


def each_layer(kernel, x, gates, counts, layers) -> None:
    for layer in layers:
        kernel(x, gates, counts, layer.w_up, layer.w_gate, layer.w_down, None, None)


def decode_table(args) -> list[dict]:
    out = []
    cases = ["tiny-moe"] if args.quick else ["demo-moe", "moe-d512-l8-e16"]
    threads = torch.get_num_threads()
    for case in cases:
        cfg = apply_overrides(load_config(REPO / "configs" / "default.toml"), [*CASES[case], "model.max_seq_len=1024"])
        torch.manual_seed(0)
        model = Transformer(cfg.model, cfg.moe).eval().bfloat16()
        prompt = torch.randint(0, cfg.model.vocab_size, (1, 256))
        for n in (1, 2):
            torch.set_num_threads(n)
            fns = {"torch": partial(decode, model, prompt, False, args.steps),
                   "kernel": partial(decode, model, prompt, True, args.steps)}  # fmt: skip
            t = alternate(fns, max(3, args.repeats // 3))
            row = {"table": "decode", "model": case, "threads": n, "torch_ms": t["torch"] * 1e3 / args.steps}
            row["kernel_ms"] = t["kernel"] * 1e3 / args.steps
            out.append(row)
            emit(args, row)
    torch.set_num_threads(threads)
    return out


@torch.inference_mode()
def decode(model, prompt, kernels: bool, steps: int) -> float:
    """Seconds of ``steps`` decode forwards after the prompt (its prefill not timed), the kernels on or off."""
    load = row_matmul._load
    if not kernels:
        row_matmul._load = lambda: "turned off by the benchmark"  # what a failed build or SPARSELM_ROW_MATMUL=off do
    try:
        cache = model.new_cache(1, prompt.shape[1] + steps + 1, dtype=torch.bfloat16)
        logits = model(prompt, cache=cache, last_only=True).logits
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, last_only=True).logits
        return time.perf_counter() - start
    finally:
        row_matmul._load = load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed call of table 3")
    ap.add_argument("--quick", action="store_true", help="the smallest setting of every table (the test's)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not row_matmul.kernel_available():
        raise SystemExit(f"the few-row kernels are not available: {row_matmul.unavailable_reason()}")
    host = machine()
    linear, experts, decodes = linear_rows_table(args), experts_table(args), decode_table(args)
    note = (
        f"{machine_summary(host)}, {args.threads} threads unless said, "
        f"{host['date']}; bf16; medians of {args.repeats} alternating calls; 1-minute load {host['load_before']:.1f} "
        "before"
    )
    head = "| linear, in -> out | rows | F.linear (us) | kernel (us) | F.linear / kernel | kernel GB/s | taken |"
    lines = [note, "", head, "|---|---:|---:|---:|---:|---:|---|"]
    lines += [
        f"| {r['shape']} | {r['rows']} | {r['torch_us']:.1f} | {r['kernel_us']:.1f} | "
        f"{r['torch_us'] / r['kernel_us']:.2f} | {r['gb_per_s']:.1f} | {r['taken']} |"
        for r in linear
    ]
    lines += ["", "| experts, E x d_model x d_ff | tokens (top-2) | busiest expert's rows | loop (us) | padded (us) | "
              "rows kernel (us) | auto picks |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    lines += [f"| {r['shape']} | {r['tokens']} | {r['busiest']} | {r['loop_us']:.0f} | {r['padded_us']:.0f} | "
              f"{r['rows_us']:.0f} | {r['auto']} |" for r in experts]  # fmt: skip
    lines += ["", "| bare decode forward, bf16 | threads | kernels off (ms per token) | kernels on | off / on |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['model']} | {r['threads']} | {r['torch_ms']:.2f} | {r['kernel_ms']:.2f} | "
              f"{r['torch_ms'] / r['kernel_ms']:.2f} |" for r in decodes]  # fmt: skip
    body = "\n".join(lines)
    if not args.json:
        print(body)
    if args.write_docs:
        cmd = "`python benchmarks/row_matmul.py --write-docs`"
        write_docs("row-matmul", "Few-row matmuls (generated)", f"Generated by {cmd}.\n\n{body}")


def emit(args, row: dict) -> None:
    if args.json:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
