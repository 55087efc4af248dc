"""Turn shard statistics, dedup and mixture results into one summary dict (``summary.json``, the report's input).

The summary is also where the accounting is checked: for every source, input documents must equal kept + filtered
+ duplicates + rejected. A mismatch is a bug in the pipeline, never bad data, so it raises.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import numpy as np

from sparselm.pipeline.config import PipelineConfig
from sparselm.pipeline.dedup import DedupResult
from sparselm.pipeline.mixture import Catalog
from sparselm.pipeline.process import HIST_BINS, ShardTask

EXAMPLES_PER_REASON = 3


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            memory_gb = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
    }


def _add(table: dict[str, dict[str, int]], other: dict[str, dict[str, int]]) -> None:
    for reason, row in other.items():
        mine = table.setdefault(reason, {"docs": 0, "tokens": 0, "bytes": 0})
        for key, value in row.items():
            mine[key] = mine.get(key, 0) + value


def _funnel(
    src_filters: list[str], selection: str, s: dict[str, Any], dups: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    """Documents and tokens going into and out of each stage, in pipeline order."""
    rows = []
    docs, tokens = s["extracted"]["docs"], s["extracted"]["tokens"]
    rows.append({"stage": "read + extract", "docs_in": s["input"]["docs"], "docs_out": docs, "tokens_out": tokens})
    stages = [*src_filters, *([f"quality_{selection}"] if selection != "none" else [])]
    for name in stages:
        removed = s["filtered"].get(name, {"docs": 0, "tokens": 0})
        rows.append(
            {
                "stage": name,
                "docs_in": docs,
                "docs_out": docs - removed["docs"],
                "tokens_in": tokens,
                "tokens_out": tokens - removed["tokens"],
            }
        )
        docs, tokens = docs - removed["docs"], tokens - removed["tokens"]
    for kind in ("exact", "near"):
        removed = dups[kind]
        rows.append(
            {
                "stage": f"dedup_{kind}",
                "docs_in": docs,
                "docs_out": docs - removed["docs"],
                "tokens_in": tokens,
                "tokens_out": tokens - removed["tokens"],
            }
        )
        docs, tokens = docs - removed["docs"], tokens - removed["tokens"]
    return rows


def summarize(
    cfg: PipelineConfig,
    tasks: list[ShardTask],
    results: list[dict[str, Any]],
    catalog: Catalog,
    dedup: DedupResult,
    dedup_examples: dict[str, list[dict[str, Any]]],
    mixture: list[dict[str, Any]],
    meta: dict[str, Any],
    quality_metrics: dict[str, Any] | None,
    timing: dict[str, Any],
) -> dict[str, Any]:
    sources: dict[str, dict[str, Any]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for task, result in zip(tasks, results, strict=True):
        s = sources.setdefault(
            task.source,
            {
                "files": 0,
                "file_bytes": 0,
                "input": {"docs": 0, "bytes": 0},
                "extracted": {"docs": 0, "tokens": 0, "bytes": 0},
                "candidates": {"docs": 0, "tokens": 0, "bytes": 0},
                "rejected": {},
                "filtered": {},
                "score_hist": None,
                "seconds": 0.0,
            },
        )
        s["files"] += 1
        s["file_bytes"] += result["file_bytes"]
        s["seconds"] += result["seconds"]
        for part in ("input", "extracted", "candidates"):
            for key, value in result[part].items():
                s[part][key] += value
        _add(s["rejected"], result["rejected"])
        _add(s["filtered"], result["filtered"])
        if result["score_hist"] is not None:
            s["score_hist"] = list(np.add(s["score_hist"] or [0] * HIST_BINS, result["score_hist"]).tolist())
        for reason, shelf in result["examples"].items():
            room = examples.setdefault(reason, [])
            room.extend({"source": task.source, **e} for e in shelf[: EXAMPLES_PER_REASON - len(room)])

    totals = {"input": 0, "kept": 0, "filtered": 0, "duplicates": 0, "rejected": 0}
    for index, src in enumerate(cfg.sources):
        s = sources[src.name]
        mine = catalog.source == index
        dups = {}
        for kind, code in (("exact", 1), ("near", 2)):
            sel = mine & (dedup.kind == code)
            dups[kind] = {"docs": int(sel.sum()), "tokens": int(catalog.tokens[sel].sum())}
        kept = mine & (dedup.duplicate_of < 0)
        s["duplicates"] = dups
        s["kept"] = {
            "docs": int(kept.sum()),
            "tokens": int(catalog.tokens[kept].sum()),
            "bytes": int(catalog.bytes[kept].sum()),
        }
        filtered = sum(row["docs"] for row in s["filtered"].values())
        rejected = sum(row["docs"] for row in s["rejected"].values())
        duplicates = dups["exact"]["docs"] + dups["near"]["docs"]
        s["accounting"] = {
            "input": s["input"]["docs"],
            "kept": s["kept"]["docs"],
            "filtered": filtered,
            "duplicates": duplicates,
            "rejected": rejected,
        }
        if s["input"]["docs"] != s["kept"]["docs"] + filtered + duplicates + rejected:
            raise RuntimeError(f"accounting mismatch for source {src.name!r}: {s['accounting']} (a pipeline bug)")
        for key in totals:
            totals[key] += s["accounting"][key]
        s["funnel"] = _funnel([n for n, _, _ in cfg.bounds(src)], src.quality, s, dups)
        if s["score_hist"] is not None and mine.any():
            s["kept_score_mean"] = round(float(np.nanmean(catalog.score[kept])), 4) if kept.any() else None

    cross = 0
    dup_idx = np.flatnonzero(dedup.duplicate_of >= 0)
    if len(dup_idx):
        cross = int((catalog.source[dup_idx] != catalog.source[dedup.duplicate_of[dup_idx]]).sum())
    run_seconds = sum(r["seconds"] for r in results)
    input_docs = sum(r["input"]["docs"] for r in results)
    input_mb = sum(r["file_bytes"] for r in results) / 1e6
    throughput = {
        # Per worker: work divided by the summed shard times, i.e. what one worker process sustains.
        "docs_per_second_per_worker": round(input_docs / run_seconds, 1) if run_seconds else None,
        "mb_per_second_per_worker": round(input_mb / run_seconds, 3) if run_seconds else None,
        "shard_seconds": round(run_seconds, 2),
        "input_mb": round(input_mb, 2),
        "input_docs": input_docs,
    }
    if timing["shards_run"] == timing["shards_total"] and timing["wall_seconds"] > 0:  # wall time is only
        # meaningful when this invocation ran every shard (a restarted run reuses some)
        throughput["wall_docs_per_second"] = round(input_docs / timing["wall_seconds"], 1)
        throughput["wall_mb_per_second"] = round(input_mb / timing["wall_seconds"], 3)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "config": cfg.to_dict(),
        "totals": totals,
        "sources": sources,
        "examples": examples,
        "dedup": {
            "exact": int((dedup.kind == 1).sum()),
            "near": int((dedup.kind == 2).sum()),
            "cross_source": cross,
            "cluster_sizes": {str(k): v for k, v in sorted(dedup.cluster_sizes().items())},
            "bands": dedup.bands,
            "rows": dedup.rows,
            "examples": dedup_examples,
        },
        "quality": quality_metrics,
        "mixture": mixture,
        "dataset": {split: {k: meta["splits"][split][k] for k in ("documents", "tokens")} for split in meta["splits"]},
        "timing": timing,
        "throughput": throughput,
    }
