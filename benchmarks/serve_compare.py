"""Server variants side by side in one run: the issue-16 target ratios for each, same prompts, same model.

Each variant is ``sparselm serve`` from some source tree with some settings (``--old-src`` is another checkout's
``src``, e.g. main's; its uvicorn runs on asyncio + h11, as a tree without uvloop and httptools would). In rounds,
every variant serves the same requests at each concurrency; in this process, the bare decode forward (1 and 2 torch
threads) and, with ``--baselines``, requests one at a time through ``generate`` and static batches of 16 through HF
transformers (benchmarks/serve.py's functions). Printed: output tokens/s and TPOT p50 per variant and concurrency,
and the three target ratios.

    python benchmarks/serve_compare.py --case demo-moe [--ckpt RUN] [--old-src DIR] [--variants old,new,...]
        [--concurrency 1,4,16,64] [--rounds 1] [--baselines] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from serve import (
    Server,
    bare_decode_ms,
    build,
    hf_static_batches,
    load_size,
    machine,
    make_requests,
    one_at_a_time,
    save,
    tokenizer_and_text,
)
from serve_load import run_load, summarize
from sparselm.precision import resolve_precision

# Runs ``sparselm`` with uvicorn's event loop and HTTP parser forced (argv[1] is a JSON object of Config keywords).
UVICORN_FORCED = (
    "import json, sys, uvicorn; forced = json.loads(sys.argv.pop(1)); init = uvicorn.Config.__init__; "
    "uvicorn.Config.__init__ = lambda self, *a, **k: init(self, *a, **{**k, **forced}); "
    "from sparselm.cli import main; sys.exit(main())"
)
PLAIN_UVICORN = {"loop": "asyncio", "http": "h11"}


def variants(old_src: str | None) -> dict[str, dict]:
    out = {}
    if old_src:
        out["old"] = {"src": old_src, "uvicorn": PLAIN_UVICORN, "args": []}
    out |= {
        "new": {"args": []},
        "new step-threads 2": {"args": ["--step-threads", "2"]},
        "new step-threads 1": {"args": ["--step-threads", "1"]},
        "new asyncio h11": {"uvicorn": PLAIN_UVICORN, "args": []},
        "new kv-bf16": {"args": ["--kv-cache-dtype", "bf16"]},
        "new sdpa": {"env": {"SPARSELM_PAGED_ATTENTION": "off"}, "args": []},  # PyTorch's attention, fp32 cache
        "new mbt 2048": {"args": ["--max-batched-tokens", "2048"]},
    }
    return out


def start(variant: dict, ckpt: Path, precision: str, threads: int, extra: list[str]) -> Server:
    launch, env = None, {}
    if "uvicorn" in variant:
        launch = ["-c", UVICORN_FORCED, json.dumps(variant["uvicorn"])]
    if "src" in variant:
        env["PYTHONPATH"] = variant["src"]
    env |= variant.get("env", {})
    return Server(ckpt, precision, threads, extra + variant["args"], launch=launch, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="demo-moe")
    ap.add_argument("--ckpt", default=None, help="a trained run (e.g. runs/demo) instead of the case's random weights")
    ap.add_argument("--old-src", default=None, help="the src directory of the tree to compare against")
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--baselines", action="store_true", help="also generate one at a time and HF static batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    table = variants(args.old_src)
    names = args.variants.split(",") if args.variants else list(table)
    levels = [int(c) for c in args.concurrency.split(",")]
    tokenizer, ids, _ = tokenizer_and_text()
    model, cfg, weights = build(args.case, args.ckpt, tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="serve-compare-"))
    quick = argparse.Namespace(quick=False)
    report = {"machine": machine(), "case": args.case, "weights": weights, "precision": precision}
    report["threads"] = args.threads
    try:
        ckpt = save(model, cfg, tokenizer, work / args.case)
        model.to(dtype)
        reqs = make_requests(ids, 64, seed=1, eod=tokenizer.eod_id)
        report["bare_decode_ms"] = {}
        for threads in (args.threads, 1):
            torch.set_num_threads(threads)
            report["bare_decode_ms"][threads] = bare_decode_ms(model, reqs[: load_size(quick, 1)], dtype)["p50"]
        torch.set_num_threads(args.threads)
        if args.baselines:
            report["baselines"] = [one_at_a_time(model, reqs[:16]), hf_static_batches(model, cfg, reqs[:16], dtype)]
        del model
        extra = ["--max-num-seqs", "64", "--max-queue", "100000"]
        if args.case != "demo-moe":
            extra += ["--kv-cache-memory", "1GiB"]
        runs = report["runs"] = []
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                server = start(table[name], ckpt, precision, args.threads, extra)
                try:
                    asyncio.run(run_load(server.base, reqs[:2], "bench", concurrency=2))  # warm-up
                    for c in levels:
                        n = load_size(quick, c)
                        load = reqs[:n] if n <= len(reqs) else make_requests(ids, n, seed=1, eod=tokenizer.eod_id)
                        results, seconds = asyncio.run(run_load(server.base, load, "bench", concurrency=c))
                        row = {"variant": name, "round": round_, "concurrency": c, **summarize(results, seconds)}
                        runs.append(row)
                        if args.json:
                            print(json.dumps(row), flush=True)
                finally:
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_after"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}) if args.json else "", flush=True)
    print(markdown(report, names, levels))


def markdown(report: dict, names: list[str], levels: list[int]) -> str:
    m = report["machine"]
    bare = report["bare_decode_ms"]
    base = {b["system"].split(",")[0]: b["output_throughput"] for b in report.get("baselines", [])}
    lines = [
        f"{report['case']}, {report['weights']}, {report['precision']}, {m['cpu']}, {m['date']}, load "
        f"{m['load_before']:.1f} -> {m['load_after']:.1f}; bare decode forward p50 "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v:.2f} ms" for t, v in bare.items())
        + (", " + ", ".join(f"{k}: {v:.1f} tok/s" for k, v in base.items()) if base else ""),
        "",
        "| variant | " + " | ".join(f"c{c} tok/s (TPOT p50 ms)" for c in levels) + " | c16 / one at a time | "
        "c16 / HF static 16 | TPOT c1 / bare forward |",
        "|---|" + "---:|" * (len(levels) + 3),
    ]
    threads = report["threads"]
    for name in names:
        rows = [r for r in report["runs"] if r["variant"] == name]
        cells = []
        for c in levels:
            at = [r for r in rows if r["concurrency"] == c]
            cells.append(", ".join(f"{r['output_throughput']:.1f} ({r['tpot_ms']['p50']:.2f})" for r in at))
        c16 = [r["output_throughput"] for r in rows if r["concurrency"] == 16]
        c1 = [r["tpot_ms"]["p50"] for r in rows if r["concurrency"] == 1]
        ratios = [
            ", ".join(f"{v / base[k]:.2f}" for v in c16) if base and c16 else "-"
            for k in ("sparselm generate", "transformers generate")
        ]
        ratios.append(", ".join(f"{v / bare[threads]:.2f}" for v in c1) if c1 else "-")
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
