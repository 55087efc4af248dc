"""The per-shard stage: one input file in, its cleaned candidates and a full account of every document out.

``process_shard(task)`` is a pure function of its task (a picklable description of one input file and every setting
that affects it): it reads the file, extracts and normalises documents, tokenises them, scores them with the quality
model (cross-fitted for the classifier's own training sources), applies the source's filters and quality
selection, and computes each survivor's dedup keys. It touches nothing but its own output files, so any executor (a
local process pool, a dask cluster) can run it, and a shard whose ``.done.json`` exists with the same key never needs
to run again. Files written for ``PREFIX``:

    PREFIX.docs.jsonl.gz    candidates (survived filters and selection): id, location, text, quality score
    PREFIX.tokens.bin       their token ids, concatenated (prepare's dtype for the tokenizer's vocabulary)
    PREFIX.index.bin        one INDEX_DTYPE record per candidate (token offset and count, exact hash, ...)
    PREFIX.minhash.bin      uint32 [candidates, num_perm] MinHash signatures
    PREFIX.ledger.jsonl.gz  one line per input document: id, location, status (candidate|filtered|rejected), reason
    PREFIX.rejects.jsonl    bad input: id, location, reason, bytes, a snippet of the raw data
    PREFIX.done.json        written last: the task key and the shard's statistics
"""

from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparselm.data.prepare import token_dtype, val_score
from sparselm.pipeline.dedup import MinHasher, exact_hash
from sparselm.pipeline.filters import BoundFilter, first_failure, normalize_document
from sparselm.pipeline.quality import QualityModel, keep_document
from sparselm.pipeline.sources import ReadOptions, Record, iter_records

INDEX_DTYPE = np.dtype(
    [
        ("ordinal", "<i8"),  # position among all records of the shard: the document id is SOURCE/SHARD/ORDINAL
        ("offset", "<i8"),
        ("tokens", "<i8"),
        ("hash", "<u8"),
        ("val", "<f8"),
        ("bytes", "<i8"),
        ("score", "<f4"),
    ]
)
OUTPUTS = ("docs.jsonl.gz", "tokens.bin", "index.bin", "minhash.bin", "ledger.jsonl.gz", "rejects.jsonl")
HIST_BINS = 20
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 400


@dataclass(frozen=True)
class ShardTask:
    source: str
    shard: int
    path: str
    prefix: str  # output path prefix, e.g. OUT/work/books/00003
    key: str  # fingerprint of everything below plus the input file's size and mtime
    options: ReadOptions
    filters: tuple[tuple[str, float | None, float | None], ...]
    tokenizer_path: str
    model_path: str = ""  # "" = no quality model
    quality: str = "none"
    quality_threshold: float = 0.5
    pareto_alpha: float = 9.0
    ngram: int = 5
    num_perm: int = 128
    seed: int = 0
    batch_docs: int = 256


@dataclass
class _Stats:
    input: dict[str, int] = field(default_factory=lambda: {"docs": 0, "bytes": 0})
    extracted: dict[str, int] = field(default_factory=lambda: {"docs": 0, "tokens": 0, "bytes": 0})
    candidates: dict[str, int] = field(default_factory=lambda: {"docs": 0, "tokens": 0, "bytes": 0})
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    filtered: dict[str, dict[str, int]] = field(default_factory=dict)
    score_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def count(self, table: dict[str, dict[str, int]], reason: str, tokens: int, size: int) -> None:
        row = table.setdefault(reason, {"docs": 0, "tokens": 0, "bytes": 0})
        row["docs"] += 1
        row["tokens"] += tokens
        row["bytes"] += size

    def example(self, reason: str, doc_id: str, location: str, text: str, value: float | None = None) -> None:
        shelf = self.examples.setdefault(reason, [])
        if len(shelf) < EXAMPLES_PER_REASON:
            shelf.append({"id": doc_id, "location": location, "value": value, "text": text[:EXAMPLE_CHARS]})


_CACHE: dict[tuple[str, str], Any] = {}  # per worker process: tokenizers and models are loaded once, not per shard


def _cached(kind: str, path: str) -> Any:
    if (kind, path) not in _CACHE:
        if kind == "tokenizer":
            from sparselm.data.tokenizer import Tokenizer

            _CACHE[(kind, path)] = Tokenizer.load(path)
        elif kind == "model":
            _CACHE[(kind, path)] = QualityModel.load(path)
        else:
            raise ValueError(kind)
    return _CACHE[(kind, path)]


def process_shard(task: ShardTask) -> dict[str, Any]:
    """Run the shard; returns (and writes to ``PREFIX.done.json``) its statistics."""
    started = time.perf_counter()
    tokenizer = _cached("tokenizer", task.tokenizer_path)
    model = _cached("model", task.model_path) if task.model_path else None
    dtype = token_dtype(tokenizer.vocab_size)
    hasher = MinHasher(task.ngram, task.num_perm, task.seed)
    filters = [BoundFilter(*f) for f in task.filters]
    stats = _Stats()
    prefix = Path(task.prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = {name: Path(f"{prefix}.{name}.tmp") for name in OUTPUTS}
    offset = 0
    with (
        gzip.open(tmp["docs.jsonl.gz"], "wt", encoding="utf-8", compresslevel=3) as docs_out,
        open(tmp["tokens.bin"], "wb") as tokens_out,
        open(tmp["index.bin"], "wb") as index_out,
        open(tmp["minhash.bin"], "wb") as minhash_out,
        gzip.open(tmp["ledger.jsonl.gz"], "wt", encoding="utf-8", compresslevel=3) as ledger_out,
        open(tmp["rejects.jsonl"], "w", encoding="utf-8") as rejects_out,
    ):

        def ledger(doc_id: str, rec: Record, status: str, reason: str = "", **extra: Any) -> None:
            entry = {"id": doc_id, "location": rec.location, "status": status, "reason": reason, **extra}
            ledger_out.write(json.dumps(entry, ensure_ascii=False) + "\n")

        def flush(batch: list[tuple[int, Record, str]]) -> None:
            nonlocal offset
            texts = [text for _, _, text in batch]
            token_ids = tokenizer.encode_batch(texts)
            if model is None:
                scores = np.full(len(texts), np.nan)
            else:  # documents of the classifier's own training sources: scored by the fold model without them
                scores = model.score_many(texts, crossfit=model.crossfits(task.source))
            for (ordinal, rec, text), ids, score in zip(batch, token_ids, scores, strict=True):
                doc_id = f"{task.source}/{task.shard:05d}/{ordinal}"
                ntok, size = len(ids), rec.size
                stats.extracted["docs"] += 1
                stats.extracted["tokens"] += ntok
                stats.extracted["bytes"] += size
                if model is not None:
                    stats.score_hist[min(int(score * HIST_BINS), HIST_BINS - 1)] += 1
                score_or_none = None if model is None else round(float(score), 4)
                failure = first_failure(text, filters)
                doc_hash = exact_hash(text)
                if failure is None and not keep_document(
                    task.quality, float(score), task.quality_threshold, task.pareto_alpha, task.seed, doc_hash
                ):
                    failure = (f"quality_{task.quality}", float(score))
                if failure is not None:
                    reason, value = failure
                    stats.count(stats.filtered, reason, ntok, size)
                    stats.example(reason, doc_id, rec.location, text, round(value, 4))
                    ledger(doc_id, rec, "filtered", reason, value=round(value, 4), tokens=ntok, score=score_or_none)
                    continue
                stats.candidates["docs"] += 1
                stats.candidates["tokens"] += ntok
                stats.candidates["bytes"] += size
                ledger(doc_id, rec, "candidate", tokens=ntok, score=score_or_none)
                entry = {"id": doc_id, "location": rec.location, "score": score_or_none, "text": text}
                docs_out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                np.asarray(ids, dtype=dtype).tofile(tokens_out)
                row = np.array(
                    [(ordinal, offset, ntok, doc_hash, val_score(task.seed, text), size, score)],
                    dtype=INDEX_DTYPE,
                )
                row.tofile(index_out)
                hasher.signature(text).tofile(minhash_out)
                offset += ntok

        batch: list[tuple[int, Record, str]] = []
        batch_chars = 0
        for ordinal, rec in enumerate(iter_records(task.path, task.options)):
            doc_id = f"{task.source}/{task.shard:05d}/{ordinal}"
            stats.input["docs"] += 1
            stats.input["bytes"] += rec.size
            if rec.text is None:
                stats.count(stats.rejected, rec.reason, 0, rec.size)
                stats.example(rec.reason, doc_id, rec.location, rec.snippet)
                reject = {"id": doc_id, "location": rec.location, "reason": rec.reason, "bytes": rec.size}
                rejects_out.write(json.dumps({**reject, "snippet": rec.snippet}, ensure_ascii=False) + "\n")
                ledger(doc_id, rec, "rejected", rec.reason, bytes=rec.size)
                continue
            text = normalize_document(rec.text)
            if not text:
                stats.count(stats.filtered, "empty", 0, rec.size)
                ledger(doc_id, rec, "filtered", "empty", tokens=0)
                continue
            batch.append((ordinal, rec, text))
            batch_chars += len(text)
            if len(batch) >= task.batch_docs or batch_chars >= 8 << 20:
                flush(batch)
                batch, batch_chars = [], 0
        if batch:
            flush(batch)
    for name in OUTPUTS:
        os.replace(tmp[name], f"{prefix}.{name}")
    result = {
        "key": task.key,
        "source": task.source,
        "shard": task.shard,
        "path": task.path,
        "file_bytes": os.path.getsize(task.path),
        "seconds": round(time.perf_counter() - started, 3),
        "input": stats.input,
        "extracted": stats.extracted,
        "candidates": stats.candidates,
        "rejected": stats.rejected,
        "filtered": stats.filtered,
        "score_hist": stats.score_hist if model is not None else None,
        "examples": stats.examples,
    }
    done = Path(f"{prefix}.done.json")
    done_tmp = done.with_name(done.name + ".tmp")
    done_tmp.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(done_tmp, done)
    return result


def read_done(prefix: str | Path, key: str) -> dict[str, Any] | None:
    """The statistics of a finished shard whose key matches, else None (never finished, or stale)."""
    done = Path(f"{prefix}.done.json")
    try:
        result = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if result.get("key") != key or not all(Path(f"{prefix}.{name}").is_file() for name in OUTPUTS):
        return None
    return result
