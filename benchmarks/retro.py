"""What retrieval costs: a training step (forward + backward) of a decoder without and with RETRO's encoder and
chunked cross-attention, dense and MoE, and the key encoder's throughput (all-MiniLM-L6-v2 over 64-token chunks).

The decoders are the RETRO experiment's full-scale shape (9 layers of width 128, CCA in layers 6 and 9, a 2-layer
encoder of width 96, seq_len 512, k = 2 neighbours of 2m = 128 tokens); the neighbours are random token ids (the
cost does not depend on which). Steps are timed in interleaved rounds (plain, RETRO, plain, RETRO, ...) after a
warm-up, medians in ms; only the ratio within one run means anything on a shared machine.

    python benchmarks/retro.py [--json] [--repeats 5] [--threads 2] [--precision bf16] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moe_layer import cpu_name, time_interleaved
from sparselm.config import load_config
from sparselm.model.transformer import Transformer
from sparselm.precision import autocast, cpu_speeds_sentence

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "retro.md"
START, END = "<!-- retro-bench:start -->", "<!-- retro-bench:end -->"
TEXT = Path("/work/shared/data/tinyshakespeare")


def model_config(args: argparse.Namespace, moe: bool, retro: bool):
    overrides = [
        "model.vocab_size=2048", "model.d_model=128", "model.n_layers=9", "model.n_heads=4", "model.d_ff=384",
        f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}",
    ]  # fmt: skip
    if moe:
        overrides += ["moe.num_experts=8", "moe.top_k=2", "moe.moe_every=2", "moe.d_ff_expert=192"]
    if retro:
        overrides += [
            "retro.enabled=true", "retro.chunk_size=64", "retro.neighbours=2", "retro.cca_start=6",
            "retro.cca_every=3", "retro.encoder_d_model=96", "retro.encoder_heads=3", "retro.encoder_d_ff=256",
        ]  # fmt: skip
        if moe:
            overrides.append("retro.encoder_moe=true")
    return load_config(None, overrides)


def train_step(args: argparse.Namespace, moe: bool, retro: bool):
    cfg = model_config(args, moe, retro)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, cfg.retro).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2048, (args.batch, args.seq_len), generator=gen)
    y = torch.randint(0, 2048, (args.batch, args.seq_len), generator=gen)
    neighbours = None
    if retro:
        neighbours = torch.randint(0, 2048, (args.batch, args.seq_len // 64, 2, 128), generator=gen)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(args.precision, torch.device("cpu")):
            out = model(x, y, neighbours=neighbours)
        out.loss.backward()

    return step, sum(p.numel() for p in model.parameters())


def key_throughput(args: argparse.Namespace) -> float:
    """Chunks per second of all-MiniLM-L6-v2 keys over 64-token chunks of real text (batches of 128)."""
    from sparselm.retro.keys import DenseKeys

    words = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(TEXT.glob("*.txt"))).split()
    texts = [" ".join(words[i : i + 48]) for i in range(0, 48 * 128 * args.key_batches, 48)]
    keys = DenseKeys(args.precision)
    keys.encode(texts[:128])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), 128):
        keys.encode(texts[i : i + 128])
    return len(texts) / (time.perf_counter() - start)


def format_table(rows: list[dict], keys_per_s: float | None, args: argparse.Namespace) -> str:
    lines = [
        f"CPU: {cpu_name()}, {args.threads} threads, {args.precision}; {cpu_speeds_sentence()}. "
        f"Batch {args.batch} x {args.seq_len} tokens, k = 2, medians of {args.repeats} interleaved rounds "
        f"(`python benchmarks/retro.py --write-docs`).",
        "",
        "| decoder | params plain | params RETRO | step plain (ms) | step RETRO (ms) | RETRO / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['decoder']} | {r['params_plain']:,} | {r['params_retro']:,} | {r['ms_plain']:,.0f} | "
            f"{r['ms_retro']:,.0f} | {r['ms_retro'] / r['ms_plain']:.2f} |"
        )
    if keys_per_s is not None:
        lines += ["", f"Key encoder (all-MiniLM-L6-v2, 48-word chunks, batches of 128): {keys_per_s:,.0f} chunks/s."]
    return "\n".join(lines)


def write_docs(table: str) -> None:
    text = DOCS.read_text()
    head, rest = text.split(START, 1)
    DOCS.write_text(head + f"{START}\n{table}\n{END}" + rest.split(END, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--key-batches", type=int, default=4, help="batches of 128 chunks to time the key encoder on")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for idle CPUs before each timed step")
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(REPO)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, moe in (("dense", False), ("MoE (8 experts, top-2)", True)):
        plain, n_plain = train_step(args, moe, retro=False)
        retro, n_retro = train_step(args, moe, retro=True)
        times, _ = time_interleaved({"plain": plain, "retro": retro}, args.repeats, not args.no_wait)
        row = {"decoder": name, "params_plain": n_plain, "params_retro": n_retro}
        row |= {"ms_plain": statistics.median(times["plain"]), "ms_retro": statistics.median(times["retro"])}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    keys_per_s = key_throughput(args) if args.key_batches else None
    if args.json:
        print(json.dumps({"key_chunks_per_s": keys_per_s}))
    table = format_table(rows, keys_per_s, args)
    if not args.json:
        print(table)
    if args.write_docs:
        write_docs(table)


if __name__ == "__main__":
    main()
