"""MinHash + LSH near-duplicate detection and exact dedup on planted duplicates."""

from __future__ import annotations

import numpy as np

from sparselm.pipeline.dedup import MinHasher, deduplicate, estimated_jaccard, exact_hash, optimal_bands

VOCAB = [f"{a}{b}" for a in ("sun", "moon", "star", "sea", "hill", "tree", "rock", "wind") for b in range(250)]


def make_docs(n: int, words: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(VOCAB, size=words)) for _ in range(n)]


def change_words(text: str, positions: list[int], seed: int = 1) -> str:
    words = text.split()
    for p in positions:
        words[p] = f"changed{seed}x{p}"
    return " ".join(words)


def run(docs: list[str], **kwargs: object):
    hasher = MinHasher(ngram=5, num_perm=128, seed=0)
    hashes = np.array([exact_hash(d) for d in docs], dtype=np.uint64)
    sigs = np.stack([hasher.signature(d) for d in docs])
    return deduplicate(hashes, sigs, **kwargs)


def test_planted_near_and_exact_duplicates_are_found_and_distinct_documents_kept() -> None:
    docs = make_docs(40)
    docs[10] = change_words(docs[3], [20, 90, 150])  # a few words changed: near duplicate of 3
    docs[25] = change_words(docs[3], [40, 120], seed=2)  # another one, same cluster
    docs[12] = "  " + docs[5].upper().replace(" ", "\n ") + "\n"  # same words, different case and layout
    docs[30] = change_words(docs[7], list(range(0, 200, 3)))  # a third of the words changed: not a duplicate
    result = run(docs, threshold=0.8)
    dups = {i: (int(result.duplicate_of[i]), int(result.kind[i])) for i in np.flatnonzero(result.duplicate_of >= 0)}
    assert dups == {10: (3, 2), 25: (3, 2), 12: (5, 1)}
    assert result.cluster_sizes() == {2: 1, 3: 1}


def test_keep_rule_is_the_lowest_index_and_ineligible_documents_are_left_alone() -> None:
    docs = make_docs(6)
    docs[4] = docs[1]
    docs[5] = change_words(docs[1], [10, 100])
    result = run(docs)
    assert result.duplicate_of.tolist() == [-1, -1, -1, -1, 1, 1]
    eligible = np.array([True, True, True, True, False, True])
    result = run(docs, eligible=eligible)
    assert result.duplicate_of.tolist() == [-1, -1, -1, -1, -1, 1]
    result = run(docs, near=False)
    assert result.duplicate_of.tolist() == [-1, -1, -1, -1, 1, -1]


def test_minhash_estimates_jaccard_and_is_deterministic() -> None:
    a = make_docs(1, words=400, seed=3)[0]
    b = change_words(a, list(range(0, 400, 40)))  # 10 changes x 5 shingles each: Jaccard ~ 0.77
    sig_a, sig_b = MinHasher(5, 256, 0).signature(a), MinHasher(5, 256, 0).signature(b)
    true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    assert abs(estimated_jaccard(sig_a, sig_b) - true) < 0.08
    assert np.array_equal(sig_a, MinHasher(5, 256, 0).signature(a))
    assert not np.array_equal(sig_a, MinHasher(5, 256, 1).signature(a))  # the seed picks the hash functions


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = text.lower().split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_optimal_bands_put_the_s_curve_at_the_threshold() -> None:
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = optimal_bands(threshold, 128)
        assert bands * rows <= 128
        midpoint = (1 / bands) ** (1 / rows)  # similarity with a 1 - 1/e chance of becoming a candidate
        assert abs(midpoint - threshold) < 0.12
