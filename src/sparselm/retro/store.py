"""The chunk database on disk, and opening it safely.

Layout of a database directory (``sparselm retro build-db``)::

    tokens.npy       [N, 2m] token ids: each chunk followed by its continuation (memory-mapped)
    chunks.npy       [N] source, position in the source split, document range, byte span (see retro/chunks.py)
    keys.npy         [N, 384] float16 dense keys (MiniLM), or bm25/ (BM25 term index)
    index.faiss      the nearest-neighbour index over the keys (Flat, IVF-PQ or HNSW)
    neighbours/      precomputed neighbours of query sets (a prepared split), NAME.npy + NAME.json
    queries/         cached keys of query chunks that are not database chunks
    db.json          written last: format, chunk size, tokenizer, sources, index, checksums of every file

A directory is a database only once ``db.json`` exists, and opening one checks every file against it (size and
SHA-256): a truncated, corrupt, swapped or half-written file is one ``DatabaseError`` naming it, never wrong
neighbours. ``check_model`` refuses a database built with another tokenizer or chunk size than the model's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparselm.errors import DatabaseError
from sparselm.retro.chunks import CHUNK_FIELDS

DB_FILE = "db.json"
FORMAT = "sparselm-retro-db"
VERSION = 1


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatabaseError(f"{path} is missing: {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatabaseError(f"{path} is not valid JSON ({exc}): {what}") from None


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def check_files(root: Path, files: dict[str, dict[str, Any]], verify: bool) -> None:
    """Every listed file exists with its recorded size (and SHA-256 when ``verify``)."""
    for name, record in files.items():
        path = root / name
        if not path.is_file():
            raise DatabaseError(f"{path} is missing (the database in {root} is incomplete; rebuild it)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise DatabaseError(
                f"{path} has {size} bytes but {record['bytes']} were written (truncated or replaced; rebuild it)"
            )
        if verify and sha256_file(path) != record["sha256"]:
            raise DatabaseError(f"{path} does not match its checksum in {root / DB_FILE} (corrupt; rebuild it)")


def load_array(path: Path, shape_tail: tuple[int, ...] | None = None, dtype=None) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatabaseError(f"{path} is not a readable array ({exc})") from None
    if shape_tail is not None and tuple(array.shape[1:]) != shape_tail:
        raise DatabaseError(f"{path} has shape {array.shape}, expected [N, {', '.join(map(str, shape_tail))}]")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise DatabaseError(f"{path} holds {array.dtype}, expected {np.dtype(dtype)}")
    return array


@dataclass
class Source:
    """One prepared split a database (or a query set) was cut from."""

    data_dir: str
    split: str
    fingerprint: str  # sha256 of the prepared directory's meta.json and the split name: identifies the tokens
    chunks: int  # chunks of the whole split
    documents: int
    first: int = 0  # first database row from this source
    count: int = 0  # database rows from this source (all chunks of the split when doc_fraction is 1)


def source_of(data_dir: str | Path, split: str, chunk_size: int) -> Source:
    from sparselm.data.loader import TokenShards

    shards = TokenShards(data_dir, split)
    meta_bytes = (Path(data_dir) / "meta.json").read_bytes()
    fingerprint = hashlib.sha256(meta_bytes + b"\0" + split.encode()).hexdigest()
    documents = int(shards.meta["splits"][split]["documents"])
    return Source(str(data_dir), split, fingerprint, shards.num_tokens // chunk_size, documents)


class Database:
    """A finished database, checked on open. Arrays are memory-mapped; the index loads on first search."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / DB_FILE
        if not meta_path.is_file():
            hint = " (an unfinished build: rerun build-db to finish it)" if (self.path / "build.json").is_file() else ""
            raise DatabaseError(f"{self.path} is not a retrieval database: no {DB_FILE}{hint}")
        self.meta = read_json(meta_path, "rebuild the database")
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DatabaseError(
                f"{meta_path}: format {self.meta.get('format')} v{self.meta.get('version')} is not {FORMAT} v{VERSION}"
            )
        check_files(self.path, self.meta["files"], verify)
        self.chunk_size: int = int(self.meta["chunk_size"])
        self.size: int = int(self.meta["chunks"])
        self.keys_kind: str = self.meta["keys"]
        self.tokenizer_sha256: str = self.meta["tokenizer_sha256"]
        self.eod_id: int = int(self.meta["eod_id"])
        self.sources = [Source(**s) for s in self.meta["sources"]]
        self.tokens = load_array(self.path / "tokens.npy", (2 * self.chunk_size,))
        self.chunks = load_array(self.path / "chunks.npy", (), CHUNK_FIELDS)
        for name, array in (("tokens.npy", self.tokens), ("chunks.npy", self.chunks)):
            if len(array) != self.size:
                raise DatabaseError(f"{self.path / name} has {len(array)} rows, {DB_FILE} says {self.size}")
        self.keys = None
        if self.keys_kind == "minilm":
            self.keys = load_array(self.path / "keys.npy", (int(self.meta["key_dim"]),), np.float16)
            if len(self.keys) != self.size:
                raise DatabaseError(f"{self.path / 'keys.npy'} has {len(self.keys)} rows, {DB_FILE} says {self.size}")
        self._index = None

    @property
    def identity(self) -> str:
        """Changes whenever any file of the database changes: neighbour tables record it."""
        files = json.dumps(self.meta["files"], sort_keys=True).encode()
        return hashlib.sha256(files).hexdigest()[:16]

    def check_model(self, tokenizer_path: str | Path, chunk_size: int) -> None:
        """Refuse to feed this database's neighbours to a model with another tokenizer or chunk size."""
        sha = sha256_file(Path(tokenizer_path))
        if sha != self.tokenizer_sha256:
            raise DatabaseError(
                f"{self.path} was built with another tokenizer (sha256 {self.tokenizer_sha256[:12]}...) than "
                f"{tokenizer_path} ({sha[:12]}...): its token ids would mean other text to the model"
            )
        if chunk_size != self.chunk_size:
            raise DatabaseError(
                f"{self.path} holds chunks of {self.chunk_size} tokens but the model uses retro.chunk_size={chunk_size}"
            )

    @property
    def index(self):
        if self._index is None:
            from sparselm.retro.index import load_index

            self._index = load_index(self)
        return self._index

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Token rows [..., 2m] of database chunks ``ids`` [...] (int64; -1, a missing neighbour, gives eod)."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.full((len(flat), 2 * self.chunk_size), self.eod_id, dtype=np.int64)
        found = flat >= 0
        if found.any():
            order = np.argsort(flat[found], kind="stable")  # sorted reads from the memory map
            rows = flat[found][order]
            picked = np.empty((len(rows), 2 * self.chunk_size), dtype=np.int64)
            picked[:] = self.tokens[rows]
            placed = np.empty_like(picked)
            placed[order] = picked
            out[found] = placed
        return out.reshape(*np.shape(ids), 2 * self.chunk_size)

    def source_index(self, fingerprint: str) -> int | None:
        for i, s in enumerate(self.sources):
            if s.fingerprint == fingerprint:
                return i
        return None
