"""Training throughput and model FLOPs utilisation (MFU) of whole models on this machine.

Runs full optimizer steps (forward, backward, clip, AdamW) exactly as ``sparselm train`` does, on random tokens
(throughput does not depend on the text), and reports tokens/s and MFU against the matmul peak measured here at the
same thread count and dtype. Configs: the default MoE and its dense base (configs/default.toml, configs/dense.toml)
and a d_model 512, 8-layer, 512-context dense model (nanoGPT's shape; the reference this project has to beat).

    python benchmarks/train.py [--json] [--quick] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sparselm.config import Config, apply_overrides, load_config
from sparselm.parallel.runtime import Runtime
from sparselm.params.counting import count_params, flops_per_token
from sparselm.precision import bf16_is_fast, cpu_speeds_sentence, measure_matmul_flops
from sparselm.train.trainer import build_model, forward_backward

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- train:start -->", "<!-- train:end -->"

D512 = [
    "model.vocab_size=32000",
    "model.d_model=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.d_ff=1408",  # SwiGLU width giving the same FFN parameters as a 4x GELU FFN (2/3 * 4 * 512, rounded)
    "model.max_seq_len=512",
    "data.seq_len=512",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
]

CASES = {
    "default-moe": ("configs/default.toml", []),
    "default-dense": ("configs/dense.toml", []),
    "dense-d512-l8-ctx512": ("configs/dense.toml", D512),
}


def bench_case(cfg: Config, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    runtime = Runtime(cfg, torch.device("cpu"))
    model = runtime.parallelize(build_model(cfg))
    model.train()
    optimizer, _ = runtime.build_optimizer(model)
    t = cfg.train
    micro = t.global_batch_size // t.micro_batch_size
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, cfg.data.seq_len))
        y = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, cfg.data.seq_len))
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, cfg, x, y, micro, runtime)
        runtime.reduce_and_clip_gradients(model, cfg.optim.grad_clip)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens = t.global_batch_size * cfg.data.seq_len
    return {"step_ms": step_time * 1e3, "tokens_per_sec": tokens / step_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--quick", action="store_true", help="2 measured steps per case (a smoke run)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument(
        "--precisions", default="", help="fp32,bf16 (default: both where this CPU computes bf16 natively, else fp32)"
    )
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(REPO)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    precisions, skipped = _precisions(args.precisions)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: measure_matmul_flops(dtypes[p], 2048, 2.0) for p in precisions}
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            ap.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        path, overrides = CASES[name]
        for precision in precisions:
            cfg = apply_overrides(load_config(REPO / path), [*overrides, f"train.precision={precision}"])
            result = bench_case(cfg, steps, warmup)
            fpt = flops_per_token(cfg, cfg.data.seq_len).train
            row = {
                "config": name,
                "precision": precision,
                "total_params": count_params(cfg).total,
                "active_params": count_params(cfg).active,
                "train_flops_per_token": fpt,
                **result,
                "mfu": result["tokens_per_sec"] * fpt / peaks[precision],
                "peak_gflops": peaks[precision] / 1e9,
            }
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    moe = {r["precision"]: r for r in rows if r["config"] == "default-moe"}
    dense = {r["precision"]: r for r in rows if r["config"] == "default-dense"}
    table = format_table(rows, moe, dense, args.threads)
    if skipped:
        table += f"\n\n{skipped}"
    if not args.json:
        print(table)
    if args.write_docs:
        write_docs(table)


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


def format_table(rows: list[dict], moe: dict, dense: dict, threads: int) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, 1-minute load average {os.getloadavg()[0]:.1f} "
        "at the end (2 cores: a load above ~2 means other jobs shared the cores). MFU = tokens/s x training FLOPs "
        "per token (6N + attention, `sparselm params`) / matmul peak measured at the same dtype and thread count.",
        "",
        "| config | precision | total params | active params | step ms | tokens/s | MFU | peak GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['precision']} | {r['total_params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M "
            f"| {r['step_ms']:.0f} | {r['tokens_per_sec']:.0f} | {r['mfu'] * 100:.1f}% | {r['peak_gflops']:.0f} |"
        )
    for p in moe:
        if p in dense:
            ratio = moe[p]["tokens_per_sec"] / dense[p]["tokens_per_sec"]
            lines.append(f"\nMoE default / dense base tokens/s ({p}): {ratio:.2f}")
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
