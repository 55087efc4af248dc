"""Data pipeline throughput: ``sparselm data run configs/pipeline/example.toml`` with 1 and 2 worker processes.

The shard stage (reading, extraction, tokenisation, quality scoring, Gopher filters, MinHash) is what scales with
workers; it is reported per worker (input divided by the summed task time) and as wall-clock throughput. The first
run trains the quality classifier; later runs reuse it, so every run does the same shard work.

    python benchmarks/data_pipeline.py [--workers 1 2] [--json] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from sparselm.pipeline.config import load_pipeline_config
from sparselm.pipeline.run import run_pipeline

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
START, END = "<!-- data_pipeline:start -->", "<!-- data_pipeline:end -->"


def bench(config: str, workers: list[int], out_root: Path) -> list[dict]:
    rows = []
    model = ""
    for n in workers:
        out = out_root / f"workers-{n}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh directory: no shard may be reused
        overrides = [f"run.out={json.dumps(str(out))}", f"run.workers={n}", "run.progress=false"]
        if model:
            overrides += [f"quality.model={json.dumps(model)}", "quality.positive=[]", "quality.negative=[]"]
        cfg = load_pipeline_config(REPO / config, overrides)
        load = os.getloadavg()[0]
        summary = run_pipeline(cfg, command=f"python benchmarks/data_pipeline.py ({config}, {n} workers)")
        model = model or str(out / "quality.npz")
        tp, tm = summary["throughput"], summary["timing"]
        rows.append(
            {
                "workers": n,
                "input_mb": tp["input_mb"],
                "input_docs": tp["input_docs"],
                "docs_per_s_per_worker": tp["docs_per_second_per_worker"],
                "mb_per_s_per_worker": tp["mb_per_second_per_worker"],
                "wall_docs_per_s": tp.get("wall_docs_per_second"),
                "wall_mb_per_s": tp.get("wall_mb_per_second"),
                "shard_stage_s": tm["wall_seconds"],
                "total_s": tm["total_seconds"],
                "trained_classifier": tm["quality_seconds"] > 0 and n == workers[0],
                "load_before": round(load, 2),
                "machine": summary["machine"],
                "date": summary["date"],
            }
        )
    return rows


def table(rows: list[dict], config: str) -> str:
    m = rows[0]["machine"]
    lines = [
        f"`sparselm data run {config}` on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM "
        f"({rows[0]['date']}; {rows[0]['input_mb']} MB, {rows[0]['input_docs']:,} documents in). The machine is "
        "shared with other jobs: `load before` is the 1-minute load average when the run started.",
        "",
        "| workers | docs/s per worker | MB/s per worker | wall docs/s | wall MB/s | shard stage s | total s "
        "| load before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['docs_per_s_per_worker']} | {r['mb_per_s_per_worker']} | {r['wall_docs_per_s']} "
            f"| {r['wall_mb_per_s']} | {r['shard_stage_s']} | {r['total_s']}{' *' if r['trained_classifier'] else ''} "
            f"| {r['load_before']} |"
        )
    lines += [
        "",
        "Per worker = input / summed shard-task time (read, extract, tokenise, score, filter, MinHash); wall = input / "
        "wall time of the shard stage. `total s` adds dedup, clean output, mixture and report, and (*) training the "
        "quality classifier, done by the first run only.",
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{START}\n{text}\n{END}"
    if START in doc:
        head, rest = doc.split(START, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n## Data pipeline throughput (`benchmarks/data_pipeline.py`)\n\n" + block + "\n"
    DOCS.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pipeline/example.toml")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--out", default="runs/bench-pipeline")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help=f"update the marked section of {DOCS}")
    args = parser.parse_args()
    os.chdir(REPO)  # the config's paths are relative to the repository root
    rows = bench(args.config, args.workers, Path(args.out))
    text = table(sorted(rows, key=lambda r: r["workers"]), args.config)
    print(json.dumps(rows, indent=1) if args.json else text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
