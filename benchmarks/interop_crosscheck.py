"""Export a checkpoint to Hugging Face files, import it back, and score both sides on PIQA and LAMBADA: lm-eval's own
``hf`` model on the export against ``sparselm eval``'s engine on the checkpoint (the numbers must agree), with the
wall time of each stage. The demo checkpoint (``make demo``: runs/demo) is the reference run in docs/interop.md.

    HF_HUB_OFFLINE=1 python benchmarks/interop_crosscheck.py [--ckpt runs/demo] [--limit N] [--json] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "interop.md"
START, END = "<!-- crosscheck:start -->", "<!-- crosscheck:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="runs/demo", help="run or checkpoint directory (default runs/demo)")
    ap.add_argument("--data-dir", help="evaluation data (default $SPARSELM_EVAL_DATA or ../shared/data)")
    ap.add_argument("--limit", type=int, default=0, help="examples per task (0 = all: 1,838 PIQA, 5,153 LAMBADA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(REPO)}")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from sparselm.checkpoint.files import resolve_checkpoint
    from sparselm.checkpoint.inference import load_checkpoint
    from sparselm.eval.tasks import resolve_data_dir
    from sparselm.interop import export_hf, import_hf
    from sparselm.interop.crosscheck import lm_eval_hf_scores, sparselm_scores, task_files

    ckpt = resolve_checkpoint(args.ckpt)
    data = resolve_data_dir(args.data_dir)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        exported = export_hf(ckpt, tmp / "hf")
        seconds["export"] = time.perf_counter() - start
        start = time.perf_counter()
        imported = import_hf(tmp / "hf", tmp / "run")
        seconds["import"] = time.perf_counter() - start
        ours, back = load_checkpoint(ckpt)[0].state_dict(), load_checkpoint(imported.out)[0].state_dict()
        bitwise = ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
        files = task_files(ckpt, data, tmp / "tasks")
        start = time.perf_counter()
        mine = sparselm_scores(ckpt, files, limit=args.limit)
        seconds["sparselm eval"] = time.perf_counter() - start
        start = time.perf_counter()
        theirs = lm_eval_hf_scores(tmp / "hf", files, tmp / "tasks", limit=args.limit)
        seconds["lm-eval hf"] = time.perf_counter() - start

    rows = [
        {
            "task": t,
            "metric": m,
            "sparselm": mine[t][m],
            "lm_eval_hf": theirs[t][m],
            "diff": relative(mine[t][m], theirs[t][m]),
        }
        for t in mine
        for m in mine[t]
    ]
    summary = {
        "checkpoint": str(ckpt),
        "architecture": exported.architecture,
        "weights_mb": exported.total_bytes / 1e6,
        "round_trip_bitwise": bitwise,
        "limit": args.limit,
        "left_out": files.left_out,
        "seconds": seconds,
    }
    if args.json:
        for row in rows:
            print(json.dumps(row))
        print(json.dumps(summary))
    table = format_table(rows, summary, args.threads)
    print(table)
    if args.write_docs:
        text = DOCS.read_text()
        block = f"{START}\n{table}\n{END}"
        if START in text:
            head, rest = text.split(START, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Cross-check on the demo checkpoint\n\n" + block + "\n"
        DOCS.write_text(text)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0


def cpu_description() -> str:
    """The CPU's model name and whether it computes bf16 natively (what decides the speed of everything here)."""
    name, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(native) if native else 'no avx512_bf16/amx_bf16'})"


def format_table(rows: list[dict], summary: dict, threads: int) -> str:
    limit = f"first {summary['limit']} examples per task" if summary["limit"] else "every example"
    if any(summary["left_out"].values()):
        dropped = ", ".join(f"{n} {t}" for t, n in summary["left_out"].items() if n)
        limit += f"; left out of both sides: {dropped} with an option longer than the model's context"
    lines = [
        f"`python benchmarks/interop_crosscheck.py --ckpt {summary['checkpoint']}` ({limit}, fp32): exported as "
        f"`{summary['architecture']}` ({summary['weights_mb']:.1f} MB), imported back "
        + ("bitwise equal" if summary["round_trip_bitwise"] else "**not** bitwise equal")
        + ".",
        "",
        "| task | metric | `sparselm eval` | lm-eval `hf` on the export | relative difference |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['task']} | {r['metric']} | {r['sparselm']:.6g} | {r['lm_eval_hf']:.6g} | {r['diff']:.1e} |" for r in rows
    ]
    times = ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    lines += [
        "",
        f"Wall time: {times}; {time.strftime('%Y-%m-%d')}, {cpu_description()}, "
        f"{threads} threads, {os.cpu_count()} cores shared with other jobs (1-minute load {os.getloadavg()[0]:.1f} "
        "at the end): the seconds say how long it took here, not how fast it can be.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
