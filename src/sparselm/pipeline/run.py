"""``sparselm data run``: the whole pipeline, restartable, from a validated config to a report.

Output directory (``run.out``)::

    work/SOURCE/NNNNN.*     per input file: candidates, tokens, dedup keys, ledger, rejects, done marker
    work/minhash.all.bin    all candidates' MinHash signatures in canonical order (memory-mapped by dedup)
    quality.npz             the classifier, when trained in this run (quality.json: its held-out metrics)
    clean/SOURCE/NNNNN.jsonl.gz   the final cleaned, filtered, deduplicated documents (id, location, score, text)
    duplicates.jsonl.gz     every removed duplicate: id, exact|near, the id of the document kept instead
    rejects.jsonl           every rejected input record with its reason and a snippet
    tokens/                 train_*.bin, val_*.bin, tokenizer.model, meta.json: set data.path to this directory
    summary.json, report.md (+ report/ plots)

Restart: a shard whose ``.done.json`` carries the same key (input file size and mtime, and every setting that
affects it) is not processed again, so a crashed or interrupted run continues from the finished shards. The later
stages (dedup, clean output, mixture, report) are cheap next to the shard stage and always run again.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sparselm.pipeline.config import PipelineConfig, SourceSection
from sparselm.pipeline.dedup import DedupResult, deduplicate
from sparselm.pipeline.executor import make_executor
from sparselm.pipeline.filters import normalize_document
from sparselm.pipeline.mixture import Catalog, build_mixture, mixture_table
from sparselm.pipeline.process import INDEX_DTYPE, OUTPUTS, ShardTask, process_shard, read_done
from sparselm.pipeline.quality import FeatureSettings, QualityModel, TrainSettings, file_sha256, train_classifier
from sparselm.pipeline.sources import ReadOptions, expand_paths, iter_records

DEDUP_EXAMPLES = 3


def read_options(cfg: PipelineConfig, src: SourceSection) -> ReadOptions:
    x = cfg.extract
    return ReadOptions(
        src.format,
        src.extractor,
        src.text_field,
        tuple(src.members),
        x.max_line_bytes,
        x.max_document_bytes,
        x.invalid_utf8,
    )


def source_documents(files: list[Path], options: ReadOptions) -> Iterator[tuple[str, str]]:
    """(location, normalised text) of every readable, non-empty document: what the classifier trains on."""
    for path in files:
        for record in iter_records(path, options):
            if record.text is not None and (text := normalize_document(record.text)):
                yield record.location, text


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def prepare_quality_model(
    cfg: PipelineConfig, out: Path, files: dict[str, list[Path]]
) -> tuple[str, dict[str, Any] | None]:
    """(model path or "", training metrics or None): load the configured model, reuse one trained earlier with
    the same settings and inputs, or train it now from the ``quality.positive`` / ``negative`` sources."""
    q = cfg.quality
    if not q.model and not (q.positive and q.negative):
        return "", None
    path = Path(q.model) if q.model else out / "quality.npz"
    if q.model and path.is_file() and not (q.positive and q.negative):
        return str(path.resolve()), QualityModel.load(path).info.get("metrics")
    if not (q.positive and q.negative):
        raise FileNotFoundError(f"quality.model={q.model!r} does not exist and quality.positive/negative are not set")
    settings = TrainSettings(
        FeatureSettings(q.n_features, q.ngram_max, q.passage_chars),
        q.max_passages_per_source,
        q.holdout_fraction,
        q.c,
        cfg.run.seed,
        q.folds,
    )
    names = [(n, 1) for n in q.positive] + [(n, 0) for n in q.negative]
    identity = [
        [n, label, dataclasses.asdict(read_options(cfg, cfg.source(n))), [_file_identity(f) for f in files[n]]]
        for n, label in names
    ]
    key = _fingerprint(dataclasses.asdict(settings), identity)
    if path.is_file():
        try:
            model = QualityModel.load(path)
            if model.info.get("train_key") == key:
                return str(path.resolve()), model.info.get("metrics")
        except ValueError:
            pass  # not a model we can read: train a new one over it
    sources = [(n, label, source_documents(files[n], read_options(cfg, cfg.source(n)))) for n, label in names]
    model, metrics = train_classifier(sources, settings, workers=cfg.run.workers)
    model.info["train_key"] = key
    model.save(path)
    (path.with_suffix(".json")).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return str(path.resolve()), metrics


def make_tasks(
    cfg: PipelineConfig, files: dict[str, list[Path]], model_path: str, tokenizer_path: str
) -> list[ShardTask]:
    work = Path(cfg.run.out).resolve() / "work"
    model_sha = file_sha256(model_path) if model_path else ""
    tokenizer_sha = file_sha256(tokenizer_path)
    tasks = []
    for src in cfg.sources:
        for shard, path in enumerate(files[src.name]):
            fields = {
                "source": src.name,
                "shard": shard,
                "path": str(path.resolve()),
                "prefix": str(work / src.name / f"{shard:05d}"),
                "options": read_options(cfg, src),
                "filters": tuple(cfg.bounds(src)),
                "tokenizer_path": tokenizer_path,
                "model_path": model_path,
                "quality": src.quality,
                "quality_threshold": src.quality_threshold,
                "pareto_alpha": src.pareto_alpha,
                "ngram": cfg.dedup.ngram,
                "num_perm": cfg.dedup.num_perm,
                "seed": cfg.run.seed,
                "batch_docs": cfg.run.batch_docs,
            }
            key = _fingerprint(
                {k: v for k, v in fields.items() if k != "batch_docs"}, _file_identity(path), model_sha, tokenizer_sha
            )
            tasks.append(ShardTask(key=key, **fields))
    return tasks


def run_tasks(cfg: PipelineConfig, tasks: list[ShardTask], executor: Any = None) -> tuple[list[dict[str, Any]], dict]:
    """Run the shards that are not finished yet; returns every shard's statistics (task order) and timings."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        done = read_done(task.prefix, task.key)
        if done is None:
            todo.append(task)
        else:
            results[task.prefix] = done
    started = time.perf_counter()
    own = executor is None and bool(todo)
    if own:
        executor = make_executor(cfg.run.executor, cfg.run.workers, cfg.run.dask_address)
    done_bytes = 0
    try:
        with tqdm(total=len(todo), desc="shards", unit="file", disable=not cfg.run.progress, dynamic_ncols=True) as bar:
            for task, result in executor.map_unordered(process_shard, todo) if todo else []:
                results[task.prefix] = result
                done_bytes += result["file_bytes"]
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix_str(f"{task.source} {done_bytes / 1e6:.1f} MB, {done_bytes / 1e6 / elapsed:.2f} MB/s")
    finally:
        if own:
            executor.close()
    timing = {
        "shards_total": len(tasks),
        "shards_run": len(todo),
        "shards_reused": len(tasks) - len(todo),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "executor": getattr(executor, "name", "none") if todo else "none",
        "workers": cfg.run.workers,
    }
    return [results[t.prefix] for t in tasks], timing


def remove_stale(work: Path, tasks: list[ShardTask]) -> None:
    """Delete shard outputs that belong to no current task (an input file removed since an earlier run)."""
    keep = {Path(f"{t.prefix}.{name}") for t in tasks for name in (*OUTPUTS, "done.json")}
    if work.is_dir():
        for path in work.glob("*/*.*"):
            if path not in keep and path.name[:5].isdigit():
                path.unlink()


def load_catalog(cfg: PipelineConfig, tasks: list[ShardTask], out: Path) -> tuple[Catalog, np.ndarray | None]:
    source_index = {s.name: i for i, s in enumerate(cfg.sources)}
    rows = [np.fromfile(f"{t.prefix}.index.bin", dtype=INDEX_DTYPE) for t in tasks]
    index = np.concatenate(rows) if rows else np.zeros(0, dtype=INDEX_DTYPE)
    sizes = [len(r) for r in rows]
    catalog = Catalog(
        source=np.repeat(np.array([source_index[t.source] for t in tasks], dtype=np.int32), sizes),
        shard=np.repeat(np.arange(len(tasks), dtype=np.int32), sizes),
        offset=index["offset"],
        tokens=index["tokens"],
        hash=index["hash"],
        val=index["val"],
        bytes=index["bytes"],
        score=index["score"],
        ordinal=index["ordinal"],
        prefixes=[t.prefix for t in tasks],
    )
    if not len(index):
        return catalog, None
    # One file of all signatures, memory-mapped: dedup reads it one band of columns at a time.
    merged = out / "work" / "minhash.all.bin"
    with open(merged, "wb") as dst:
        for t in tasks:
            with open(f"{t.prefix}.minhash.bin", "rb") as src:
                shutil.copyfileobj(src, dst)
    return catalog, np.memmap(merged, dtype=np.uint32, mode="r", shape=(len(index), cfg.dedup.num_perm))


def doc_id(catalog: Catalog, tasks: list[ShardTask], i: int) -> str:
    task = tasks[int(catalog.shard[i])]
    return f"{task.source}/{task.shard:05d}/{int(catalog.ordinal[i])}"


def write_outputs(
    catalog: Catalog, tasks: list[ShardTask], dedup: DedupResult, out: Path
) -> dict[str, list[dict[str, Any]]]:
    """clean/, duplicates.jsonl.gz and rejects.jsonl; returns a few duplicate examples with both texts."""
    dups = np.flatnonzero(dedup.duplicate_of >= 0)
    wanted: dict[str, list[int]] = {"exact": [], "near": []}
    for i in dups:
        kind = "exact" if dedup.kind[i] == 1 else "near"
        if len(wanted[kind]) < DEDUP_EXAMPLES:
            wanted[kind].append(int(i))
    need = {i for group in wanted.values() for i in group} | {
        int(dedup.duplicate_of[i]) for g in wanted.values() for i in g
    }
    texts: dict[int, str] = {}
    clean = out / "clean"
    shutil.rmtree(clean, ignore_errors=True)
    per_shard = np.bincount(catalog.shard, minlength=len(tasks))
    base = 0
    for shard, task in enumerate(tasks):
        target = clean / task.source / f"{task.shard:05d}.jsonl.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            gzip.open(f"{task.prefix}.docs.jsonl.gz", "rt", encoding="utf-8") as src,
            gzip.open(target, "wt", encoding="utf-8", compresslevel=3) as dst,
        ):
            for k, line in enumerate(src):
                i = base + k
                if i in need:
                    texts[i] = json.loads(line)["text"]
                if dedup.duplicate_of[i] < 0:
                    dst.write(line)
        base += int(per_shard[shard])
    with gzip.open(out / "duplicates.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in dups:
            kind = "exact" if dedup.kind[i] == 1 else "near"
            kept = doc_id(catalog, tasks, int(dedup.duplicate_of[i]))
            f.write(json.dumps({"id": doc_id(catalog, tasks, int(i)), "kind": kind, "kept": kept}) + "\n")
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
        for task in tasks:
            with open(f"{task.prefix}.rejects.jsonl", encoding="utf-8") as src:
                shutil.copyfileobj(src, f)
    examples: dict[str, list[dict[str, Any]]] = {}
    for kind, group in wanted.items():
        examples[kind] = [
            {
                "id": doc_id(catalog, tasks, i),
                "kept": doc_id(catalog, tasks, int(dedup.duplicate_of[i])),
                "text": texts.get(i, "")[:400],
                "kept_text": texts.get(int(dedup.duplicate_of[i]), "")[:400],
            }
            for i in group
        ]
    return examples


def run_pipeline(
    cfg: PipelineConfig, *, command: str = "", report_path: str | Path | None = None, executor: Any = None
) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``OUT/summary.json``) and writes the report."""
    from sparselm.data.tokenizer import Tokenizer
    from sparselm.pipeline.report import write_report
    from sparselm.pipeline.summary import summarize

    started = time.time()
    out = Path(cfg.run.out)
    tokenizer_path = Path(cfg.tokenizer.path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"tokenizer.path={cfg.tokenizer.path!r} does not exist; train one with "
            "`sparselm tokenizer train --out data_cache/tokenizer --vocab-size 8192`"
        )
    tokenizer = Tokenizer.load(tokenizer_path)
    files: dict[str, list[Path]] = {}
    for src in cfg.sources:
        try:
            files[src.name] = expand_paths(src.paths)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"source {src.name!r}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    model_path, quality_metrics = prepare_quality_model(cfg, out, files)
    quality_seconds = time.perf_counter() - t0
    tasks = make_tasks(cfg, files, model_path, str(tokenizer_path.resolve()))
    results, timing = run_tasks(cfg, tasks, executor)
    timing["quality_seconds"] = round(quality_seconds, 3)
    remove_stale(out.resolve() / "work", tasks)
    t0 = time.perf_counter()
    catalog, signatures = load_catalog(cfg, tasks, out)
    eligible = np.array([cfg.sources[s].dedup for s in catalog.source], dtype=bool)
    d = cfg.dedup
    dedup = deduplicate(catalog.hash, signatures, d.threshold, d.exact, d.near, eligible)
    del signatures
    dedup_examples = write_outputs(catalog, tasks, dedup, out)
    timing["dedup_seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    kept = dedup.duplicate_of < 0
    m = cfg.mixture
    mixes, meta = build_mixture(
        catalog,
        kept,
        [(s.name, s.weight, s.epochs) for s in cfg.sources],
        tokenizer,
        out / "tokens",
        total_tokens=m.total_tokens,
        val_fraction=m.val_fraction,
        max_epochs=m.max_epochs,
        shard_tokens=m.shard_tokens,
        seed=cfg.run.seed,
        inputs=[p for s in cfg.sources for p in s.paths],
    )
    timing["mixture_seconds"] = round(time.perf_counter() - t0, 3)
    timing["total_seconds"] = round(time.time() - started, 3)
    summary = summarize(
        cfg, tasks, results, catalog, dedup, dedup_examples, mixture_table(mixes), meta, quality_metrics, timing
    )
    summary["command"] = command
    summary["tokenizer"] = {"path": str(tokenizer_path), "vocab_size": tokenizer.vocab_size}
    summary["outputs"] = {
        "tokens": str(out / "tokens"),
        "clean": str(out / "clean"),
        "rejects": str(out / "rejects.jsonl"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_report(summary, Path(report_path) if report_path else out / "report.md")
    return summary
