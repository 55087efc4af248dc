"""``sparselm retro build-db``: prepared token splits -> chunk store -> keys -> index -> training neighbours.

Stages run in order and the build is restartable: ``build.json`` records the recipe and how far the build got, the
key file is flushed every few batches, so an interrupted build (Ctrl-C, a killed job) continues where it stopped
when rerun with the same arguments, and refuses to mix with a different recipe. ``db.json`` is written last.

A smaller database can be cut from a built one (``--from-db BIG --doc-fraction 0.1``): a seeded sample of whole
documents, copying their chunks and keys instead of encoding them again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.retro.chunks import CHUNK_FIELDS, chunk_texts, iter_chunks, token_byte_lengths
from sparselm.retro.index import build_dense_index, resolve_kind, save_index
from sparselm.retro.keys import DENSE_DIM, DENSE_ENCODER, KEY_KINDS, DenseKeys, bm25_tokens
from sparselm.retro.store import (
    DB_FILE,
    FORMAT,
    VERSION,
    Database,
    DatabaseError,
    Source,
    file_record,
    read_json,
    sha256_file,
    source_of,
    write_json_atomic,
)

STATE_FILE = "build.json"
FLUSH_EVERY = 16  # encoder batches between two saves of the build state
_OUTPUTS = ("tokens.npy", "chunks.npy", "keys.npy", "index.faiss", "tokenizer.model", "bm25", "neighbours", "queries")


@dataclass
class BuildOptions:
    out: Path
    data: list[tuple[str, str]] = field(default_factory=list)  # (prepared directory, split)
    chunk_size: int = 64
    keys: str = "minilm"  # minilm | bm25
    index: str = "auto"  # auto | flat | ivfpq | hnsw
    flat_max: int = 100_000  # auto: exact search up to this many chunks
    doc_fraction: float = 1.0  # keep a seeded sample of this fraction of the documents
    seed: int = 0
    from_db: Path | None = None  # cut from this database (its sources, chunks and keys) instead of --data
    queries: list[tuple[str, str]] | None = None  # neighbour tables to precompute (None: train + val of --data)
    keep: int = 10  # neighbours kept per query chunk (training reads the first retro.neighbours)
    reuse_keys: list[Path] = field(default_factory=list)  # databases whose query keys are reused, not re-encoded
    batch_size: int = 128  # chunks per encoder batch
    precision: str = "auto"
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.data and self.from_db is None:
            raise InputError("build-db needs --data PREPARED_DIR (or --from-db DATABASE)")
        if self.data and self.from_db is not None:
            raise InputError("build-db takes --data or --from-db, not both")
        if self.keys not in KEY_KINDS:
            raise InputError(f"--keys must be one of {', '.join(KEY_KINDS)}, got {self.keys!r}")
        if self.chunk_size < 1 or self.keep < 1 or self.batch_size < 1:
            raise InputError("--chunk-size, --keep and --batch-size must be >= 1")
        if not 0.0 < self.doc_fraction <= 1.0:
            raise InputError(f"--doc-fraction must be in (0, 1], got {self.doc_fraction}")
        resolve_kind(self.index, 1, self.flat_max)


def build_database(opts: BuildOptions, say=print) -> Database:
    out = opts.out
    parent = Database(opts.from_db) if opts.from_db is not None else None
    if parent is not None:
        opts.chunk_size, opts.keys = parent.chunk_size, parent.keys_kind
        sources = [Source(**{**asdict(s), "first": 0, "count": 0}) for s in parent.sources]
        tokenizer_path = parent.path / "tokenizer.model"
    else:
        sources = [source_of(d, split, opts.chunk_size) for d, split in opts.data]
        tokenizer_path = _common_tokenizer(opts.data)
    recipe = _recipe(opts, sources, parent, sha256_file(tokenizer_path))
    state = _claim(out, recipe, opts.overwrite)
    if state.get("done"):
        say(f"{out} is already built with these settings")
    else:
        timings = state.setdefault("seconds", {})
        if not state.get("chunks_done"):
            started = time.perf_counter()
            shutil.copyfile(tokenizer_path, out / "tokenizer.model")
            _write_chunks(opts, out, sources, parent, tokenizer_path)
            state.update(chunks_done=True, sources=[asdict(s) for s in sources], keys_done=_copied_keys(parent))
            timings["chunks"] = time.perf_counter() - started
            write_json_atomic(out / STATE_FILE, state)
        sources = [Source(**s) for s in state["sources"]]
        _write_keys(opts, out, state)
        _finish(opts, out, state, sources, parent, say)
    db = Database(out)
    queries = opts.queries
    if queries is None:
        queries = [(d, s) for d, _ in opts.data[:1] for s in ("train", "val")] if opts.data else []
    if queries:
        from sparselm.retro.neighbours import precompute_neighbours

        reuse = [Database(path, verify=False) for path in opts.reuse_keys]
        for data_dir, split in queries:
            precompute_neighbours(
                db, data_dir, split, opts.keep, opts.batch_size, opts.precision, opts.progress, say, reuse
            )
    return db


def _common_tokenizer(data: list[tuple[str, str]]) -> Path:
    from sparselm.data.loader import TokenShards

    shas = {}
    for d, split in data:
        shards = TokenShards(d, split)
        shas[shards.meta["tokenizer"]["sha256"]] = shards.tokenizer_path
    if len(shas) != 1:
        raise InputError(f"the --data directories were tokenised with {len(shas)} different tokenizers; use one")
    return next(iter(shas.values()))


def _recipe(opts: BuildOptions, sources: list[Source], parent: Database | None, tokenizer_sha: str) -> dict:
    return {
        "sources": [[s.fingerprint, s.split] for s in sources],
        "chunk_size": opts.chunk_size,
        "keys": opts.keys,
        "index": opts.index,
        "flat_max": opts.flat_max,
        "doc_fraction": opts.doc_fraction,
        "seed": opts.seed,
        "parent": parent.identity if parent is not None else None,
        "tokenizer_sha256": tokenizer_sha,
    }


def _claim(out: Path, recipe: dict, overwrite: bool) -> dict:
    """The build state to continue from; refuses to touch a directory holding something else."""
    done, pending = out / DB_FILE, out / STATE_FILE
    if overwrite:
        for name in (DB_FILE, STATE_FILE, *_OUTPUTS):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif done.is_file():
        built = read_json(done, "rebuild with --overwrite")
        if built.get("recipe") != recipe:
            raise DatabaseError(f"{out} holds a database built with other settings; use another --out or --overwrite")
        return {"recipe": recipe, "done": True}
    elif pending.is_file():
        state = read_json(pending, "delete it or pass --overwrite")
        if state.get("recipe") != recipe:
            raise DatabaseError(f"{out} holds an unfinished build with other settings; use --overwrite to restart it")
        return state
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a retrieval database; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    state = {"recipe": recipe}
    write_json_atomic(pending, state)
    return state


def _selected_docs(source_index: int, documents: int, fraction: float, seed: int) -> np.ndarray | None:
    if fraction >= 1.0:
        return None
    return np.random.default_rng([seed, source_index]).random(documents) < fraction


def _write_chunks(opts: BuildOptions, out: Path, sources: list[Source], parent: Database | None, tok: Path) -> None:
    from sparselm.data.loader import TokenShards

    m = opts.chunk_size
    if parent is not None:
        keep = np.zeros(parent.size, dtype=bool)
        for i, s in enumerate(sources):
            docs = _selected_docs(i, s.documents, opts.doc_fraction, opts.seed)
            rows = parent.chunks["source"] == i
            keep |= rows if docs is None else rows & docs[parent.chunks["doc_first"]]
        chosen = np.flatnonzero(keep)
        tokens = open_memmap(out / "tokens.npy", "w+", parent.tokens.dtype, (len(chosen), 2 * m))
        chunks = open_memmap(out / "chunks.npy", "w+", CHUNK_FIELDS, (len(chosen),))
        keys = None
        if parent.keys is not None:
            keys = open_memmap(out / "keys.npy", "w+", np.float16, (len(chosen), DENSE_DIM))
        for start in range(0, len(chosen), 1 << 16):
            rows = chosen[start : start + (1 << 16)]
            tokens[start : start + len(rows)] = parent.tokens[rows]
            chunks[start : start + len(rows)] = parent.chunks[rows]
            if keys is not None:
                keys[start : start + len(rows)] = parent.keys[rows]
        for i, s in enumerate(sources):
            s.first = int(np.searchsorted(chunks["source"], i))
            s.count = int((chunks["source"] == i).sum())
        for array in (tokens, chunks, keys):
            if array is not None:
                array.flush()
        return
    byte_lengths = token_byte_lengths(tok)
    selections = [_selected_docs(i, s.documents, opts.doc_fraction, opts.seed) for i, s in enumerate(sources)]

    def blocks(i: int, s: Source):
        for block in iter_chunks(TokenShards(s.data_dir, s.split), m, byte_lengths):
            keep = slice(None) if selections[i] is None else selections[i][block.fields["doc_first"]]
            block.fields["source"] = i
            yield block.tokens[keep], block.fields[keep]

    counts = [
        sum(len(f) for _, f in blocks(i, s)) if selections[i] is not None else s.chunks for i, s in enumerate(sources)
    ]
    total = sum(counts)
    if total == 0:
        raise InputError("the database would hold no chunks: use more data, a larger --doc-fraction or smaller chunks")
    dtype = TokenShards(sources[0].data_dir, sources[0].split).dtype
    tokens = open_memmap(out / "tokens.npy", "w+", dtype, (total, 2 * m))
    chunks = open_memmap(out / "chunks.npy", "w+", CHUNK_FIELDS, (total,))
    row = 0
    with tqdm(total=total, desc="chunks", unit="chunk", disable=not opts.progress, dynamic_ncols=True) as bar:
        for i, s in enumerate(sources):
            s.first, s.count = row, counts[i]
            for block_tokens, block_fields in blocks(i, s):
                tokens[row : row + len(block_fields)] = block_tokens
                chunks[row : row + len(block_fields)] = block_fields
                row += len(block_fields)
                bar.update(len(block_fields))
    tokens.flush()
    chunks.flush()


def _copied_keys(parent: Database | None) -> int:
    return -1 if parent is not None and parent.keys is not None else 0  # -1: the keys came with the chunks


def _write_keys(opts: BuildOptions, out: Path, state: dict) -> None:
    from sparselm.data.tokenizer import Tokenizer

    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    total, m = len(tokens), opts.chunk_size
    tokenizer = Tokenizer.load(out / "tokenizer.model")
    if opts.keys == "bm25":
        if not (out / "bm25").is_dir():
            import bm25s

            terms: list[list[str]] = []
            for start in tqdm(range(0, total, 4096), desc="bm25", unit="block", disable=not opts.progress):
                terms.extend(bm25_tokens(chunk_texts(tokenizer, tokens[start : start + 4096], m)))
            retriever = bm25s.BM25()
            retriever.index(terms, show_progress=False)
            shutil.rmtree(out / "bm25.tmp", ignore_errors=True)
            retriever.save(str(out / "bm25.tmp"), show_progress=False)
            (out / "bm25.tmp").rename(out / "bm25")
        return
    done = int(state.get("keys_done", 0))
    if done < 0 or done >= total:
        return
    keys = open_memmap(out / "keys.npy", "r+" if done else "w+", np.float16, (total, DENSE_DIM))
    encoder = DenseKeys.shared(opts.precision)
    started, first = time.perf_counter(), done
    bar = tqdm(total=total, initial=done, desc="keys", unit="chunk", disable=not opts.progress, dynamic_ncols=True)
    group = opts.batch_size * FLUSH_EVERY  # encoded in order of length within the group, saved after it
    with bar:
        for start in range(done, total, group):
            rows = tokens[start : start + group]
            keys[start : start + len(rows)] = encoder.encode(
                chunk_texts(tokenizer, rows, m), opts.batch_size, bar.update
            )
            keys.flush()
            state["keys_done"] = start + len(rows)
            state.setdefault("embedding", {"chunks": 0, "seconds": 0.0})
            state["embedding"]["chunks"] += state["keys_done"] - first
            state["embedding"]["seconds"] += time.perf_counter() - started
            started, first = time.perf_counter(), state["keys_done"]
            write_json_atomic(out / STATE_FILE, state)


def _finish(opts: BuildOptions, out: Path, state: dict, sources: list[Source], parent: Database | None, say) -> None:
    total = len(np.load(out / "chunks.npy", mmap_mode="r"))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "chunk_size": opts.chunk_size,
        "chunks": total,
        "keys": opts.keys,
        "key_encoder": DENSE_ENCODER if opts.keys == "minilm" else "bm25s",
        "key_dim": DENSE_DIM if opts.keys == "minilm" else 0,
        "tokenizer_sha256": state["recipe"]["tokenizer_sha256"],
        "eod_id": _eod_id(out),
        "sources": [asdict(s) for s in sources],
        "doc_fraction": opts.doc_fraction,
        "seed": opts.seed,
        "parent": str(parent.path) if parent is not None else None,
        "recipe": state["recipe"],
    }
    names = ["tokens.npy", "chunks.npy", "tokenizer.model"]
    started = time.perf_counter()
    if opts.keys == "minilm":
        keys = np.load(out / "keys.npy", mmap_mode="r")
        kind = resolve_kind(opts.index, total, opts.flat_max)
        index, meta["index"] = build_dense_index(keys, kind, opts.seed, opts.progress)
        save_index(index, out / "index.faiss")
        names += ["keys.npy", "index.faiss"]
    else:
        meta["index"] = {"kind": "bm25"}
        names += sorted(str(p.relative_to(out)) for p in (out / "bm25").rglob("*") if p.is_file())
    embedding = state.get("embedding", {"chunks": 0, "seconds": 0.0})
    meta["build"] = {
        "chunk_seconds": round(state.get("seconds", {}).get("chunks", 0.0), 2),
        "index_seconds": round(time.perf_counter() - started, 2),
        "embedded_chunks": embedding["chunks"],
        "embed_seconds": round(embedding["seconds"], 2),
        "chunks_per_second": round(embedding["chunks"] / embedding["seconds"], 1) if embedding["seconds"] else None,
    }
    meta["files"] = {name: file_record(out / name) for name in names}
    write_json_atomic(out / DB_FILE, meta)
    (out / STATE_FILE).unlink(missing_ok=True)
    rate = meta["build"]["chunks_per_second"]
    say(
        f"built {out}: {total:,} chunks of {opts.chunk_size} tokens, {meta['index']['kind']} index"
        + (f"; keys at {rate:,.0f} chunks/s ({rate * opts.chunk_size:,.0f} tokens/s)" if rate else "")
    )


def _eod_id(out: Path) -> int:
    from sparselm.data.tokenizer import Tokenizer

    return Tokenizer.load(out / "tokenizer.model").eod_id
