"""Decode attention of a serving step: PyTorch's SDPA, one call per sequence over its keys in place in an fp32 pool
(what the engine does without the kernel), against ``sparselm.ops.paged_decode_attention``, one call for all
sequences, over an fp32 and a bf16 pool.

Each row is one layer's decode attention for ``--seqs`` sequences of ``L`` keys each, head size 64, blocks of 16.
The pools of ``--layers`` layers are cycled so that keys come from memory, not cache, as in a real step (the default
8 layers of 16 sequences of 800 keys over 8 heads hold 210 MB in fp32). Times are medians of ``--repeats`` passes
over all layers, in ms per layer; "GB/s" is the bytes of keys and values read over the time.

    python benchmarks/paged_attention.py [--json] [--heads 4,8] [--lengths 200,450,800] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from parallel_bench import write_docs
from serve import machine, machine_summary
from sparselm.ops import paged_attention

REPO = Path(__file__).resolve().parents[1]


def pools(heads: int, length: int, args, dtype) -> tuple[list, torch.Tensor, torch.Tensor]:
    per_seq = -(-length // args.block)
    shape = (heads, args.seqs * per_seq, args.block, args.head_dim)
    layers = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(args.layers)]
    tables = torch.arange(args.seqs * per_seq).view(args.seqs, per_seq)
    return layers, tables, torch.full((args.seqs,), length)


def sdpa_per_sequence(q, layers, tables, lengths) -> None:
    for k, v in layers:
        for s in range(q.shape[0]):
            first, length = int(tables[s, 0]), int(lengths[s])
            keys = k[:, first : first + tables.shape[1]].flatten(1, 2)[None, :, :length]
            values = v[:, first : first + tables.shape[1]].flatten(1, 2)[None, :, :length]
            F.scaled_dot_product_attention(q[s][None, :, None], keys, values)


def kernel(q, layers, tables, lengths) -> None:
    for k, v in layers:
        paged_attention.paged_decode_attention(q, k, v, tables, lengths)


def measure(args, fn, *fn_args) -> float:
    fn(*fn_args)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn(*fn_args)
        times.append((time.perf_counter() - start) / args.layers * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--heads", default="4,8")
    ap.add_argument("--lengths", default="200,450,800")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not paged_attention.kernel_available():
        raise SystemExit(f"the paged kernel is not available: {paged_attention.unavailable_reason()}")
    host = machine()
    rows = []
    for heads in map(int, args.heads.split(",")):
        for length in map(int, args.lengths.split(",")):
            q = torch.randn(args.seqs, heads, args.head_dim)
            fp32 = pools(heads, length, args, torch.float32)
            bf16 = pools(heads, length, args, torch.bfloat16)
            sdpa_ms = measure(args, sdpa_per_sequence, q, *fp32)
            for name, data, dtype_bytes in (("kernel, fp32 pool", fp32, 4), ("kernel, bf16 pool", bf16, 2)):
                ms = measure(args, kernel, q, *data)
                moved = 2 * args.seqs * heads * length * args.head_dim * dtype_bytes
                row = {"heads": heads, "keys": length, "impl": name, "ms": ms, "sdpa_fp32_ms": sdpa_ms}
                row |= {"speedup": sdpa_ms / ms, "gb_per_s": moved / ms / 1e6}
                rows.append(row)
                if args.json:
                    print(json.dumps(row))
    note = (
        f"{machine_summary(host)}, {args.threads} threads, {host['date']}; "
        f"{args.seqs} sequences, head size {args.head_dim}, blocks of {args.block}, {args.layers} layers cycled; "
        f"1-minute load {host['load_before']:.1f} before"
    )
    table = [
        "| heads | keys | SDPA per sequence, fp32 pool (ms) | kernel | ms | SDPA / kernel | GB/s |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    table += [
        f"| {r['heads']} | {r['keys']} | {r['sdpa_fp32_ms']:.3f} | {r['impl']} | {r['ms']:.3f} | "
        f"{r['speedup']:.2f} | {r['gb_per_s']:.1f} |"
        for r in rows
    ]
    body = "\n".join([note, "", *table])
    if not args.json:
        print(body)
    if args.write_docs:
        cmd = "`python benchmarks/paged_attention.py --write-docs`"
        write_docs("paged-attention", "Decode attention kernel (generated)", f"Generated by {cmd}.\n\n{body}")


if __name__ == "__main__":
    main()
