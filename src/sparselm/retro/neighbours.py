"""Neighbours of every chunk of a prepared split (a query set), precomputed once and stored with the database.

Query chunk i of a split is cut exactly as database chunks are (retro/chunks.py), so chunk ``w * seq_len / m + u``
is chunk u of training window w. Its neighbours are the ``keep`` most similar database chunks after the leakage
filter: a database chunk from the same split whose document range (chunk + continuation) meets the query's is
dropped, so nothing is retrieved from the document being predicted. The search widens (4x at a time) for the rows
that the filter left short; a row that still has fewer than ``keep`` holds -1 (an eod-only neighbour).

The table ``neighbours/NAME.npy`` [chunks, keep] int64 comes with ``NAME.json``: the database identity, the query
split's fingerprint and a checksum, checked on every load, so a table can never be used with another database or
other data than it was computed for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.retro.chunks import chunk_texts, iter_chunks, token_byte_lengths
from sparselm.retro.keys import DENSE_DIM, DenseKeys, bm25_tokens
from sparselm.retro.store import (
    Database,
    DatabaseError,
    Source,
    read_json,
    sha256_file,
    source_of,
    write_json_atomic,
)

SEARCH_BLOCK = 4096  # queries per search call


def table_name(source: Source) -> str:
    return f"{source.split}-{source.fingerprint[:12]}"


def query_chunks(source: Source, m: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, 2m], fields [n]) of every chunk of a query split."""
    from sparselm.data.loader import TokenShards

    shards = TokenShards(source.data_dir, source.split)
    tokens, fields = [], []
    for block in iter_chunks(shards, m, token_byte_lengths(shards.tokenizer_path)):
        tokens.append(block.tokens)
        fields.append(block.fields)
    return np.concatenate(tokens), np.concatenate(fields)


def _lineage(db: Database | None):
    """``db`` and the databases it was cut from, nearest first."""
    while db is not None:
        yield db
        parent = db.meta.get("parent")
        db = Database(parent, verify=False) if parent and Path(parent, "db.json").is_file() else None


def _keys_from(db: Database, source: Source, reuse: Sequence[Database] = ()) -> np.ndarray | None:
    """Keys of the whole query split if ``db``, a database it was cut from or one of ``reuse`` (databases keyed by
    the same encoder with the same chunk size) holds every chunk of it, or has encoded them as queries already."""
    for owner in (db, *reuse):
        if owner.keys_kind != db.keys_kind or owner.chunk_size != db.chunk_size:
            raise InputError(f"{owner.path} has other keys or chunks than {db.path}: its query keys cannot be reused")
        for holder in _lineage(owner):
            i = holder.source_index(source.fingerprint)
            if i is not None and holder.keys is not None and holder.sources[i].count == source.chunks:
                first = holder.sources[i].first
                return holder.keys[first : first + source.chunks]
            cache = holder.path / "queries" / f"{table_name(source)}.keys.npy"
            info = holder.path / "queries" / f"{table_name(source)}.keys.json"
            if cache.is_file() and info.is_file() and read_json(info, "delete it").get("done") == source.chunks:
                return np.load(cache, mmap_mode="r")
    return None


def query_keys(
    db: Database,
    source: Source,
    tokens: np.ndarray,
    batch_size: int,
    precision: str,
    progress: bool,
    reuse: Sequence[Database] = (),
):
    """Dense keys of the query chunks: reused from a database holding the split (``db``, its parents, ``reuse``),
    else encoded (resumably) into ``queries/`` of ``db``; chunks the database holds are copied, not encoded again."""
    found = _keys_from(db, source, reuse)
    if found is not None:
        return found
    from sparselm.data.tokenizer import Tokenizer

    folder = db.path / "queries"
    folder.mkdir(exist_ok=True)
    cache, info = folder / f"{table_name(source)}.keys.npy", folder / f"{table_name(source)}.keys.json"
    state = read_json(info, "delete it") if info.is_file() else {}
    done = int(state.get("encoded", 0)) if cache.is_file() and state.get("fingerprint") == source.fingerprint else 0
    keys = open_memmap(cache, "r+" if done else "w+", np.float16, (len(tokens), DENSE_DIM))
    known = np.zeros(len(tokens), dtype=bool)
    i = db.source_index(source.fingerprint)
    if i is not None and db.keys is not None:
        rows = np.flatnonzero(db.chunks["source"] == i)
        positions = db.chunks["position"][rows]
        keys[positions] = db.keys[rows]
        known[positions] = True
    todo = np.flatnonzero(~known)
    tokenizer = Tokenizer.load(db.path / "tokenizer.model")
    encoder = DenseKeys.shared(precision) if done < len(todo) else None
    bar = tqdm(total=len(todo), initial=done, desc="query keys", unit="chunk", disable=not progress)
    group = batch_size * 16  # encoded in order of length within the group, saved after it
    with bar:
        for start in range(done, len(todo), group):
            rows = todo[start : start + group]
            keys[rows] = encoder.encode(chunk_texts(tokenizer, tokens[rows], db.chunk_size), batch_size, bar.update)
            keys.flush()
            write_json_atomic(info, {"encoded": start + len(rows), "fingerprint": source.fingerprint})
    keys.flush()
    write_json_atomic(info, {"encoded": len(todo), "done": len(tokens), "fingerprint": source.fingerprint})
    return keys


def search_filtered(db: Database, queries, fields: np.ndarray, source: Source | None, keep: int) -> np.ndarray:
    """Ids [n, keep] of the best database chunks for each query (keys or BM25 terms), leakage filter applied when
    the queries come from a split the database holds (``source``)."""
    n = len(fields)
    out = np.full((n, keep), -1, dtype=np.int64)
    src = db.source_index(source.fingerprint) if source is not None else None
    pending = np.arange(n)
    width = min(db.size, 4 * keep + 16)
    while len(pending):
        picked = queries[pending] if isinstance(queries, np.ndarray) else [queries[i] for i in pending]
        _, ids = db.index.search(picked, width)
        usable = ids >= 0
        if src is not None:
            safe = np.where(usable, ids, 0)
            other = db.chunks["source"][safe] != src
            q = fields[pending]
            apart = (db.chunks["doc_last"][safe] < q["doc_first"][:, None]) | (
                db.chunks["doc_first"][safe] > q["doc_last"][:, None]
            )
            usable &= other | apart
        counts = usable.sum(1)
        short = (counts < keep) & (width < db.size)
        for row in np.flatnonzero(~short):
            chosen = ids[row][usable[row]][:keep]
            out[pending[row], : len(chosen)] = chosen
        pending = pending[short]
        width = min(db.size, width * 4)
    return out


def precompute_neighbours(
    db: Database,
    data_dir: str | Path,
    split: str,
    keep: int = 10,
    batch_size: int = 128,
    precision: str = "auto",
    progress: bool = True,
    say=print,
    reuse: Sequence[Database] = (),
) -> Path:
    """Compute (or find up to date) the neighbour table of ``split`` of ``data_dir`` in ``db``; query keys that
    ``reuse`` (other databases with the same encoder and chunk size) already hold are not encoded again."""
    from sparselm.data.loader import TokenShards

    source = source_of(data_dir, split, db.chunk_size)
    db.check_model(TokenShards(data_dir, split).tokenizer_path, db.chunk_size)
    folder = db.path / "neighbours"
    npy, info = folder / f"{table_name(source)}.npy", folder / f"{table_name(source)}.json"
    if info.is_file():
        meta = read_json(info, "delete it")
        if meta.get("database") == db.identity and meta.get("keep", 0) >= keep:
            return npy
    folder.mkdir(exist_ok=True)
    started = time.perf_counter()
    tokens, fields = query_chunks(source, db.chunk_size, progress)
    if db.keys_kind == "minilm":
        queries = query_keys(db, source, tokens, batch_size, precision, progress, reuse)
    else:
        from sparselm.data.tokenizer import Tokenizer

        queries = bm25_tokens(chunk_texts(Tokenizer.load(db.path / "tokenizer.model"), tokens, db.chunk_size))
    table = np.empty((len(fields), keep), dtype=np.int64)
    desc = f"neighbours {split}"
    with tqdm(total=len(fields), desc=desc, unit="chunk", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(fields), SEARCH_BLOCK):
            stop = min(start + SEARCH_BLOCK, len(fields))
            block = queries[start:stop]
            table[start:stop] = search_filtered(db, block, fields[start:stop], source, keep)
            bar.update(stop - start)
    tmp = npy.with_name(npy.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    tmp.replace(npy)
    meta = {
        "database": db.identity,
        "data_dir": str(data_dir),
        "split": split,
        "fingerprint": source.fingerprint,
        "chunk_size": db.chunk_size,
        "chunks": len(fields),
        "keep": keep,
        "missing": int((table < 0).sum()),
        "same_document_excluded": db.source_index(source.fingerprint) is not None,
        "seconds": round(time.perf_counter() - started, 1),
        "sha256": sha256_file(npy),
    }
    write_json_atomic(info, meta)
    say(f"neighbours of {len(fields):,} {split} chunks of {data_dir} ({keep} each) -> {npy}")
    return npy


def load_neighbours(db: Database, data_dir: str | Path, split: str, k: int, verify: bool = True) -> np.ndarray:
    """The precomputed table [chunks, >= k] of ``split`` of ``data_dir``, checked against the database and data."""
    source = source_of(data_dir, split, db.chunk_size)
    npy = db.path / "neighbours" / f"{table_name(source)}.npy"
    info = npy.with_suffix(".json")
    if not info.is_file():
        raise DatabaseError(
            f"{db.path} has no neighbours for the {split} split of {data_dir}: run `sparselm retro neighbours "
            f"--db {db.path} --data {data_dir} --split {split}`"
        )
    meta = read_json(info, "recompute it with `sparselm retro neighbours`")
    if meta.get("database") != db.identity:
        raise DatabaseError(f"{npy} was computed for another build of {db.path}; recompute it")
    if meta.get("keep", 0) < k:
        raise InputError(f"{npy} keeps {meta.get('keep')} neighbours per chunk, {k} were asked for")
    if not npy.is_file() or (verify and sha256_file(npy) != meta.get("sha256")):
        raise DatabaseError(f"{npy} is missing or does not match its checksum (corrupt); recompute it")
    table = np.load(npy, mmap_mode="r", allow_pickle=False)
    if table.shape != (source.chunks, meta["keep"]) or table.dtype != np.int64:
        raise DatabaseError(f"{npy} has shape {table.shape}, expected ({source.chunks}, {meta['keep']})")
    return table
