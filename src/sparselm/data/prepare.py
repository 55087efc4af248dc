"""Tokenise documents into memory-mappable token shards plus ``meta.json``: the input of training.

Layout of a prepared directory::

    train_00000.bin ...   raw little-endian uint16 (uint32 if vocab_size > 65535) token ids, eod after every document
    val_00000.bin ...     the held-out documents, same format
    tokenizer.model       copy of the tokenizer used, so the data and its ids always travel together
    meta.json             written last: its presence is what marks the directory as prepared

Validation documents are chosen by a seeded hash of the document text, so the split does not depend on file paths,
input order or the number of workers, and exact duplicates always land in the same split (no val leakage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sparselm.data.reader import Document, ReadStats, iter_documents
from sparselm.data.tokenizer import ENCODE_CHUNK_CHARS, Tokenizer, split_text
from sparselm.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
_TASK_CHARS = 1 << 20  # text per worker task: large enough to amortise IPC, small enough to keep memory flat
_TMP_SUFFIX = ".tmp"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def prepare(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 2,
    text_field: str = "text",
    shard_tokens: int = 50_000_000,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenise ``inputs`` into ``out_dir`` and return the meta dict that is also written to ``meta.json``.

    ``workers`` <= 1 tokenises in this process. With two or more documents, both splits get at least one (even with
    ``val_fraction=0``). Raises ``FileNotFoundError`` for a missing tokenizer or input, ``FileExistsError`` if
    ``out_dir`` is already prepared (unless ``overwrite``) and ``ValueError`` if no document was found. Bad data is
    never an error: it is counted per file in ``meta["report"]`` and logged as warnings.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise InputError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    tokenizer = Tokenizer.load(tokenizer_path)  # fails fast on a missing or invalid model
    stats = ReadStats()
    documents = iter_documents(inputs, text_field=text_field, stats=stats)  # fails fast on a missing input
    out_dir = Path(out_dir)
    _claim_output_dir(out_dir, overwrite)

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    try:
        router = _SplitRouter(writers)
        with (
            tqdm(desc="prepare", unit="doc", disable=not progress, dynamic_ncols=True) as bar,
            # closing(): stop the worker pool as soon as anything fails, not whenever the generator is collected.
            closing(_tokenize(documents, tokenizer, dtype, val_fraction, seed, workers, bar)) as stream,
        ):
            for split, parts in stream:
                router.add(split, parts)
        router.finish()
        if router.documents["train"] + router.documents["val"] == 0:
            raise InputError(f"no documents found in {[str(p) for p in inputs]}; read report: {stats.totals()}")
        shards = {split: writer.commit() for split, writer in writers.items()}
        meta = _build_meta(tokenizer, dtype, shards, router.documents, stats, inputs, val_fraction, seed, shard_tokens)
        _copy_atomic(tokenizer.path, out_dir / TOKENIZER_FILE)
        _write_json_atomic(out_dir / META_FILE, meta)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for source, counter, count in stats.problems():
        log.warning("%s: %d x %s", source, count, counter)
    return meta


def _claim_output_dir(out_dir: Path, overwrite: bool) -> None:
    meta = out_dir / META_FILE
    if meta.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a prepared dataset ({META_FILE}); pass overwrite=True")
        meta.unlink()  # first, so a crash while re-preparing never leaves the old meta describing new shards
    out_dir.mkdir(parents=True, exist_ok=True)
    # Shards without a meta.json belong to no dataset (an aborted run, or the one being overwritten).
    for pattern in ("train_*.bin", "val_*.bin", f"*.bin{_TMP_SUFFIX}", f"{TOKENIZER_FILE}{_TMP_SUFFIX}"):
        for stale in out_dir.glob(pattern):
            stale.unlink()


def val_score(seed: int, text: str | bytes) -> float:
    """A uniform number in [0, 1) fixed by (seed, text); a document is held out when it is < val_fraction."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64


# ---- tokenisation: the main process reads and chunks, workers encode ------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _worker_init(tokenizer_path: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = Tokenizer.load(tokenizer_path)
    _worker_dtype = np.dtype(dtype)


def _encode_task(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None and _worker_dtype is not None
    return [np.array(ids, dtype=_worker_dtype) for ids in _worker_tokenizer.encode_batch(texts)]


def _tokenize(
    documents: Iterator[Document],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    workers: int,
    bar: tqdm,
) -> Iterator[tuple[str, list[np.ndarray]]]:
    """Yield (split, token arrays) per document, in input order; the last array ends with eod.

    Long documents are cut into ENCODE_CHUNK_CHARS pieces (see ``split_text``), so one 50 MB line costs bounded
    memory per call and its pieces spread over all workers. Tasks are submitted with a bounded queue rather than
    Pool.imap, whose feeder would otherwise read the whole corpus into memory when reading outpaces encoding.
    """
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, _worker_init, (str(tokenizer.path), dtype.str))
    else:
        _worker_init(str(tokenizer.path), dtype.str)
    # Each task carries one label per piece: (split, document size in bytes on its last piece, else None).
    pending: deque[tuple[Any, list[tuple[str, int | None]]]] = deque()
    parts: list[np.ndarray] = []
    done_bytes = done_tokens = 0

    def finished(block: bool) -> Iterator[tuple[str, list[np.ndarray]]]:
        nonlocal parts, done_bytes, done_tokens
        while pending and (block or len(pending) > 2 * workers or pending[0][0].ready()):
            result, labels = pending.popleft()
            for tokens, (split, doc_bytes) in zip(result.get(), labels, strict=True):
                parts.append(tokens)
                done_tokens += len(tokens)
                if doc_bytes is not None:
                    parts.append(eod)
                    yield split, parts
                    parts = []
                    done_bytes += doc_bytes
                    bar.update(1)
                    bar.set_postfix_str(f"{done_bytes / 1e6:.1f} MB, {done_tokens / 1e6:.2f}M tokens", refresh=False)

    try:
        batch: list[str] = []
        labels: list[tuple[str, int | None]] = []
        batch_chars = 0
        for doc in documents:
            encoded = doc.text.encode("utf-8")
            split = "val" if val_score(seed, encoded) < val_fraction else "train"
            doc_bytes = len(encoded)
            del encoded
            pieces = list(split_text(doc.text, ENCODE_CHUNK_CHARS))
            for i, piece in enumerate(pieces):
                batch.append(piece)
                labels.append((split, doc_bytes if i == len(pieces) - 1 else None))
                batch_chars += len(piece)
                if batch_chars >= _TASK_CHARS:
                    pending.append((_submit(pool, batch), labels))
                    batch, labels, batch_chars = [], [], 0
                    yield from finished(block=False)
        if batch:
            pending.append((_submit(pool, batch), labels))
        yield from finished(block=True)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


class _Done:
    """Stand-in for an AsyncResult when encoding in-process."""

    def __init__(self, value: list[np.ndarray]) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self) -> list[np.ndarray]:
        return self.value


def _submit(pool: Any, texts: list[str]) -> Any:
    return _Done(_encode_task(texts)) if pool is None else pool.apply_async(_encode_task, (texts,))


# ---- writing ----------------------------------------------------------------------------------------------------


class _SplitRouter:
    """Writes each document to its split, holding back the latest one per split.

    If the hash put every document in one split, the held-back document moves to the empty split at ``finish``,
    so with two or more documents both splits are non-empty. Only one document per split is ever held.
    """

    def __init__(self, writers: dict[str, _ShardWriter]) -> None:
        self.writers = writers
        self.held: dict[str, list[np.ndarray] | None] = dict.fromkeys(writers)
        self.documents = dict.fromkeys(writers, 0)

    def add(self, split: str, parts: list[np.ndarray]) -> None:
        self._flush(split)
        self.held[split] = parts

    def finish(self) -> None:
        train, val = self.held["train"], self.held["val"]
        if val is None and train is not None and self.documents["train"] >= 1:
            self.held["train"], self.held["val"] = None, train
        elif train is None and val is not None and self.documents["val"] >= 1:
            self.held["val"], self.held["train"] = None, val
        for split in self.writers:
            self._flush(split)

    def _flush(self, split: str) -> None:
        parts = self.held[split]
        if parts is not None:
            for tokens in parts:
                self.writers[split].write(tokens)
            self.documents[split] += 1
            self.held[split] = None


class _ShardWriter:
    """Appends tokens to ``<split>_NNNNN.bin.tmp`` files of exactly ``shard_tokens`` tokens (the last may be short)."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[tuple[str, int]] = []  # (final name, tokens), including the open one
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(tokens):
            if self.file is None or self.shards[-1][1] == self.shard_tokens:
                self._open_next()
            name, count = self.shards[-1]
            take = min(len(tokens), self.shard_tokens - count)
            self.file.write(tokens[:take].tobytes())
            self.shards[-1] = (name, count + take)
            tokens = tokens[take:]

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        name = shard_name(self.split, len(self.shards))
        self.file = open(self.out_dir / (name + _TMP_SUFFIX), "wb")  # noqa: SIM115 - stays open across writes
        self.shards.append((name, 0))

    def commit(self) -> list[dict[str, Any]]:
        """Close and rename every shard into place; returns the shard list for meta.json."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for name, _ in self.shards:
            os.replace(self.out_dir / (name + _TMP_SUFFIX), self.out_dir / name)
        return [{"file": name, "tokens": count} for name, count in self.shards]

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for name, _ in self.shards:
            for path in (self.out_dir / (name + _TMP_SUFFIX), self.out_dir / name):
                path.unlink(missing_ok=True)


def _build_meta(
    tokenizer: Tokenizer,
    dtype: np.dtype,
    shards: dict[str, list[dict[str, Any]]],
    documents: dict[str, int],
    stats: ReadStats,
    inputs: list[str | Path],
    val_fraction: float,
    seed: int,
    shard_tokens: int,
) -> dict[str, Any]:
    # No timestamps or absolute output paths: the same inputs and seed give a byte-identical directory.
    return {
        "format": "sparselm-tokens",
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "byte_order": "little",
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "bos_id": tokenizer.bos_id,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": _sha256(tokenizer.path), "source": str(tokenizer.path)},
        "splits": {
            split: {
                "documents": documents[split],
                "tokens": sum(s["tokens"] for s in shards[split]),
                "shards": shards[split],
            }
            for split in SPLITS
        },
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "inputs": [str(p) for p in inputs],
        "report": stats.to_dict(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + _TMP_SUFFIX)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
