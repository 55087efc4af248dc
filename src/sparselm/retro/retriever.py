"""Retrieval at use time, for token sequences nobody precomputed (prompts, evaluation texts, generated text).

Each complete chunk of m tokens of a sequence (chunks start at the sequence's first token, as in training) is
decoded to text, keyed with the database's key kind and searched; the ids of its k nearest database chunks come
back, cached by chunk content so that rolling windows and generation never search the same chunk twice. Text given
at use time has no document identity, so no leakage filter applies here (the paper evaluates the same way; the
experiment uses precomputed, filtered neighbours for held-out documents instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sparselm.errors import InputError
from sparselm.retro.store import Database


class Retriever:
    def __init__(self, db: Database, k: int, precision: str = "auto") -> None:
        from sparselm.data.tokenizer import Tokenizer

        if k < 1:
            raise InputError(f"the number of neighbours must be >= 1, got {k}")
        self.db, self.k, self.precision = db, k, precision
        self.m = db.chunk_size
        self.tokenizer = Tokenizer.load(db.path / "tokenizer.model")
        self._encoder = None
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self.searched = 0  # chunks actually searched (not answered from the cache)

    def _queries(self, texts: list[str]):
        if self.db.keys_kind == "bm25":
            from sparselm.retro.keys import bm25_tokens

            return bm25_tokens(texts)
        if self._encoder is None:
            from sparselm.retro.keys import DenseKeys

            self._encoder = DenseKeys.shared(self.precision)
        return self._encoder.encode(texts)

    def chunk_ids(self, chunks: list[Sequence[int]]) -> np.ndarray:
        """[n, k] database ids of the neighbours of each chunk (-1 where the database has fewer)."""
        keys = [tuple(int(t) for t in c) for c in chunks]
        todo = list(dict.fromkeys(c for c in keys if c not in self._cache))
        if todo:
            texts = [self.tokenizer.decode(list(c)) for c in todo]
            _, ids = self.db.index.search(self._queries(texts), self.k)
            if ids.shape[1] < self.k:
                ids = np.pad(ids, ((0, 0), (0, self.k - ids.shape[1])), constant_values=-1)
            for chunk, row in zip(todo, ids, strict=True):
                self._cache[chunk] = row
            self.searched += len(todo)
        return np.stack([self._cache[c] for c in keys]) if keys else np.zeros((0, self.k), dtype=np.int64)

    def ids_for(self, sequences: list[Sequence[int]], chunks: int) -> np.ndarray:
        """[B, chunks, k] ids for each sequence's first ``chunks`` chunks; chunks a sequence does not complete
        (it is shorter: padding) get -1."""
        out = np.full((len(sequences), chunks, self.k), -1, dtype=np.int64)
        wanted, where = [], []
        for b, seq in enumerate(sequences):
            for u in range(min(chunks, len(seq) // self.m)):
                wanted.append(seq[u * self.m : (u + 1) * self.m])
                where.append((b, u))
        if wanted:
            found = self.chunk_ids(wanted)
            for (b, u), row in zip(where, found, strict=True):
                out[b, u] = row
        return out

    def neighbours_for(self, sequences: list[Sequence[int]], length: int) -> torch.Tensor:
        """Neighbour tokens [B, length // m, k, 2m] for a batch padded to ``length`` tokens."""
        return torch.from_numpy(self.db.neighbour_tokens(self.ids_for(sequences, length // self.m)))
