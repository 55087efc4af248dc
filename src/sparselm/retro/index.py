"""Nearest-neighbour search over the database keys: faiss for dense keys, bm25s for BM25.

Dense indexes (inner product over unit vectors = cosine similarity):
- ``flat``: exact search, every query against every key (the default up to ``flat_max`` chunks);
- ``ivfpq``: an inverted file of sqrt-sized lists with 48-byte product-quantised codes, both trained on a seeded
  sample of the keys (the default above ``flat_max``): ~1/16 of the memory, approximate;
- ``hnsw``: a graph index over the full vectors (fast queries, slow to build: 300 s per million here).
Keys are added in batches read from the memory-mapped key file, so building needs the index's memory plus one batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sparselm.errors import DatabaseError, InputError

INDEX_KINDS = ("auto", "flat", "ivfpq", "hnsw")
ADD_BATCH = 65_536
PQ_BYTES = 48  # 384-d keys: 8 dimensions per sub-quantiser
IVF_NPROBE = 32
HNSW_M = 32
HNSW_EF_SEARCH = 128


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError(
            "dense retrieval needs the retro extra (faiss-cpu is missing): pip install 'sparselm[retro]'"
        ) from None
    return faiss


def resolve_kind(requested: str, size: int, flat_max: int) -> str:
    if requested not in INDEX_KINDS:
        raise InputError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {requested!r}")
    if requested == "auto":
        return "flat" if size <= flat_max else "ivfpq"
    return requested


def _ivf_shape(size: int) -> tuple[int, int, int]:
    """(lists, training sample, bits per code) for ``size`` keys: ~4 sqrt(N) lists, >= 39 training points each."""
    lists = 2 ** max(4, round(math.log2(4 * math.sqrt(size))))
    sample = min(size, max(64 * lists, 50_000), 256 * lists)
    lists = max(1, min(lists, sample // 39))
    bits = max(4, min(8, int(math.log2(max(sample // 39, 16)))))
    return lists, sample, bits


def build_dense_index(keys: np.ndarray, kind: str, seed: int, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train (on a seeded sample) and fill an index over ``keys`` [N, d] (any float dtype, memory-mapped)."""
    faiss = _faiss()
    size, dim = keys.shape
    params: dict[str, Any] = {"kind": kind}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        params.update(m=HNSW_M, ef_search=HNSW_EF_SEARCH)
    elif kind == "ivfpq":
        lists, sample, bits = _ivf_shape(size)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, lists, PQ_BYTES, bits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        rows = np.sort(np.random.default_rng(seed).choice(size, size=sample, replace=False))
        train = np.ascontiguousarray(keys[rows], dtype=np.float32)
        index.train(train)
        index.nprobe = min(IVF_NPROBE, lists)
        params.update(lists=lists, trained_on=sample, code_bytes=PQ_BYTES, bits=bits, nprobe=index.nprobe)
    else:
        raise InputError(f"unknown index kind {kind!r}")
    with tqdm(total=size, desc="index", unit="key", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, size, ADD_BATCH):
            index.add(np.ascontiguousarray(keys[start : start + ADD_BATCH], dtype=np.float32))
            bar.update(min(ADD_BATCH, size - start))
    return index, params


def save_index(index: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _faiss().write_index(index, str(tmp))
    os.replace(tmp, path)


class DenseSearcher:
    def __init__(self, index: Any) -> None:
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, k] of the k most similar keys of each query row; id -1 where fewer exist."""
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids


class BM25Searcher:
    def __init__(self, retriever: Any, size: int) -> None:
        self.retriever, self.size = retriever, size

    def search(self, queries: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunks sharing no term with the query score 0 and are not neighbours (id -1)."""
        k = min(k, self.size)
        empty = [not q for q in queries]
        padded = [q or ["\u2400"] for q in queries]  # bm25s wants a term; an unknown one scores nothing
        ids, scores = self.retriever.retrieve(padded, k=k, show_progress=False, n_threads=0)
        ids = np.where(scores > 0, ids, -1).astype(np.int64)
        ids[np.array(empty, dtype=bool)] = -1
        return scores.astype(np.float32), ids


def load_index(db) -> DenseSearcher | BM25Searcher:

    if db.keys_kind == "bm25":
        import bm25s

        try:
            retriever = bm25s.BM25.load(str(db.path / "bm25"), show_progress=False)
        except Exception as exc:  # bm25s raises whatever its readers raise on a damaged file
            raise DatabaseError(f"{db.path / 'bm25'}: cannot load the BM25 index ({exc})") from None
        return BM25Searcher(retriever, db.size)
    faiss = _faiss()
    path = db.path / "index.faiss"
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DatabaseError(f"{path} is not a readable faiss index ({str(exc).splitlines()[0]})") from None
    if index.ntotal != db.size or index.d != int(db.meta["key_dim"]):
        raise DatabaseError(
            f"{path} holds {index.ntotal} keys of dimension {index.d}, the database {db.size} of {db.meta['key_dim']}"
        )
    if hasattr(index, "nprobe"):
        index.nprobe = int(db.meta["index"].get("nprobe", IVF_NPROBE))
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(db.meta["index"].get("ef_search", HNSW_EF_SEARCH))
    return DenseSearcher(index)
