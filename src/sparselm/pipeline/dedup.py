"""Exact and near-duplicate detection: normalised-text hashes, MinHash signatures and LSH banding.

Why numpy rather than ``datasketch``: signatures are computed in the shard workers and clustered later over all
sources, so they must be plain arrays that can be stored per shard and read back band by band; datasketch's MinHash
objects (and its Python-level LSH index) would have to be pickled per document and held in memory at once. The
maths is small enough to own:

- shingles: word n-grams (default 5) of the lower-cased document, each word hashed with BLAKE2b (stable across
  processes, unlike ``hash``) and combined into a 64-bit n-gram hash;
- ``num_perm`` hash functions ``h_i(x) = (a_i * x + b_i) mod 2**64`` with odd random ``a_i`` (multiply-shift
  hashing), of which the top 32 bits are kept; the signature is the per-function minimum over all shingles, and the
  fraction of equal signature entries estimates the Jaccard similarity of the two shingle sets;
- LSH: the signature is cut into ``bands`` of ``rows`` entries, chosen to minimise the false-positive plus
  false-negative probability mass around ``threshold`` (the scheme datasketch uses); documents that agree on a whole
  band are candidates, and a candidate pair is a duplicate when its estimated Jaccard is >= ``threshold``.

Keep rule: documents are numbered in a canonical order (sources in config order, then input file order, then position
in the file); every cluster of duplicates keeps its lowest-numbered document, so an earlier-listed source wins.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from sparselm.pipeline.filters import group_sorted, ngram_hashes

_CHUNK = 4096  # shingles per step: bounds the [num_perm, chunk] work array to a few MB for book-length documents


def exact_hash(text: str) -> int:
    """64-bit hash of the text lower-cased with all whitespace runs collapsed (so layout-only copies collide)."""
    normal = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest(), "little")


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x5EED])
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]


class MinHasher:
    """Computes MinHash signatures (uint32[num_perm]) of documents; identical for the same (ngram, num_perm, seed)."""

    def __init__(self, ngram: int = 5, num_perm: int = 128, seed: int = 0) -> None:
        self.ngram, self.num_perm = ngram, num_perm
        self.a, self.b = _permutations(num_perm, seed)

    def signature(self, text: str) -> np.ndarray:
        words = text.lower().split()
        if not words:
            return np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, len(words))
        word_hash = np.fromiter(
            (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little") for w in vocab),
            np.uint64,
            len(vocab),
        )
        shingles = ngram_hashes(word_hash[ids], min(self.ngram, len(words)))
        order, starts, _ = group_sorted(shingles)
        shingles = shingles[order[starts]]  # distinct shingles only
        result = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), _CHUNK):
                chunk = shingles[start : start + _CHUNK][None, :]
                np.minimum(result, (self.a * chunk + self.b).min(axis=1), out=result)
        return (result >> np.uint64(32)).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising false positives + false negatives around threshold."""
    xs = np.linspace(0.0, 1.0, 201)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows < 1:
            break
        p = 1.0 - (1.0 - xs**rows) ** bands  # probability that a pair of similarity x becomes a candidate
        below, above = xs < threshold, xs >= threshold
        error = np.trapezoid(p[below], xs[below]) + np.trapezoid(1.0 - p[above], xs[above])
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


@dataclass
class DedupResult:
    """For every document (canonical order): -1 if kept, else the index of the document it duplicates."""

    duplicate_of: np.ndarray
    kind: np.ndarray  # 0 kept, 1 exact duplicate, 2 near duplicate
    bands: int
    rows: int

    def cluster_sizes(self) -> dict[int, int]:
        """{cluster size: number of clusters} over clusters with at least one duplicate."""
        reps = self.duplicate_of[self.duplicate_of >= 0]
        if len(reps) == 0:
            return {}
        _, members = np.unique(reps, return_counts=True)
        sizes, counts = np.unique(members + 1, return_counts=True)
        return {int(s): int(c) for s, c in zip(sizes, counts, strict=True)}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the lower index becomes the root: it is the document the cluster keeps
            lo, hi = min(ri, rj), max(ri, rj)
            self.parent[hi] = lo


def deduplicate(
    hashes: np.ndarray,
    signatures: np.ndarray | None,
    threshold: float = 0.8,
    exact: bool = True,
    near: bool = True,
    eligible: np.ndarray | None = None,
) -> DedupResult:
    """Cluster documents given in canonical order by exact hash and MinHash similarity; keep the first of each.

    ``signatures`` may be a memory-mapped [n, num_perm] array: it is read one band of columns at a time.
    ``eligible`` (bool per document, default all) excludes documents of sources with ``dedup = false``.
    """
    n = len(hashes)
    eligible = np.ones(n, dtype=bool) if eligible is None else eligible
    duplicate_of = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    bands, rows = (0, 0)
    if exact and n:
        idx = np.flatnonzero(eligible)
        order, starts, sizes = group_sorted(hashes[idx])
        rep = np.empty(len(idx), dtype=np.int64)
        rep[order] = np.repeat(idx[order[starts]], sizes)  # stable sort: a group's first = lowest canonical index
        dup = rep != idx
        duplicate_of[idx[dup]] = rep[dup]
        kind[idx[dup]] = 1
    if near and signatures is not None and n:
        num_perm = signatures.shape[1]
        bands, rows = optimal_bands(threshold, num_perm)
        live = np.flatnonzero(eligible & (duplicate_of < 0))
        uf = _UnionFind(n)
        checked: set[tuple[int, int]] = set()
        for band in range(bands):
            cols = np.asarray(signatures[live, band * rows : (band + 1) * rows]).astype(np.uint64)
            band_hash = cols[:, 0].copy()
            with np.errstate(over="ignore"):
                for r in range(1, rows):
                    band_hash = band_hash * np.uint64(0x100000001B3) + cols[:, r]
            order, starts, sizes = group_sorted(band_hash)
            for s, size in zip(starts, sizes, strict=True):
                if size < 2:
                    continue
                members = live[order[s : s + size]]  # ascending: live is sorted and the sort is stable
                first = int(members[0])
                for other in members[1:]:
                    pair = (first, int(other))
                    if pair in checked:
                        continue
                    checked.add(pair)
                    if estimated_jaccard(signatures[first], signatures[pair[1]]) >= threshold:
                        uf.union(*pair)
        for i in live:
            root = uf.find(int(i))
            if root != i:
                duplicate_of[i], kind[i] = root, 2
        # An exact copy of a near duplicate belongs to the near duplicate's cluster (whose root is always kept).
        exact_dups = np.flatnonzero(kind == 1)
        moved = duplicate_of[duplicate_of[exact_dups]] >= 0
        duplicate_of[exact_dups[moved]] = duplicate_of[duplicate_of[exact_dups[moved]]]
    return DedupResult(duplicate_of, kind, bands, rows)
