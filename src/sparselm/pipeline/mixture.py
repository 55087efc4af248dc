"""Mixture: sample the kept documents of each source by weight (or epochs) into train/validation token shards.

- Validation is held out by document, per source, with ``prepare.val_score`` (a seeded hash of the text), exactly as
  ``sparselm prepare`` does; each validation document appears once, in its natural proportion.
- Train: a source with ``epochs = e`` contributes ``e`` times its train tokens. Sources with ``weight`` share the
  remaining budget in proportion to their weights; the budget is ``mixture.total_tokens`` minus the epoch sources'
  tokens, or, when ``total_tokens = 0``, the train tokens the weighted sources have (the mixture re-weights without
  growing the corpus). No weighted source is repeated more than ``max_epochs`` times; a capped source makes the
  realised mixture differ from the requested one, which the report shows.
- Sampling is whole documents: ``floor(target / available)`` full passes over the source, then documents in a seeded
  random order until the target is reached (overshooting by at most one document). The sampled documents of all
  sources are shuffled together (seeded) before writing, so copies of one document are spread through the data.

Shards are written with ``sparselm.data.prepare``'s own writer and metadata, so the output directory is exactly what
``sparselm train`` (``data.loader.TokenShards``) reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# prepare's private writer and metadata builder are reused on purpose: one shard format, one implementation.
from sparselm.data.prepare import (
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    _build_meta,
    _claim_output_dir,
    _copy_atomic,
    _ShardWriter,
    _write_json_atomic,
    token_dtype,
)
from sparselm.data.reader import ReadStats
from sparselm.errors import InputError


@dataclass
class Catalog:
    """Every candidate document of the run, in canonical order (sources in config order, shards, position)."""

    source: np.ndarray  # int32 index into the config's sources
    shard: np.ndarray  # int32 index into ``prefixes``
    offset: np.ndarray  # int64 token offset in its shard's tokens.bin
    tokens: np.ndarray  # int64
    hash: np.ndarray  # uint64 exact-dedup hash
    val: np.ndarray  # float64 validation score in [0, 1)
    bytes: np.ndarray  # int64
    score: np.ndarray  # float32 quality score (nan without a model)
    ordinal: np.ndarray  # int64 position in its shard (the document id is SOURCE/SHARD/ORDINAL)
    prefixes: list[str]

    def __len__(self) -> int:
        return len(self.source)


@dataclass
class SourceMix:
    name: str
    weight: float
    epochs: float  # requested epochs (0 for weighted sources)
    train_docs: int
    train_tokens: int
    val_docs: int
    val_tokens: int
    target_tokens: float = 0.0
    requested_share: float = 0.0
    capped: bool = False
    sampled_docs: int = 0
    sampled_tokens: int = 0
    realised_share: float = 0.0

    @property
    def realised_epochs(self) -> float:
        return self.sampled_tokens / self.train_tokens if self.train_tokens else 0.0


def plan_targets(mixes: list[SourceMix], total_tokens: int, max_epochs: float) -> None:
    """Fill ``target_tokens``, ``requested_share`` and ``capped`` of every source (see the module docstring)."""
    fixed = sum(m.epochs * m.train_tokens for m in mixes if m.epochs > 0)
    weighted = [m for m in mixes if m.weight > 0]
    weight_sum = sum(m.weight for m in weighted)
    if total_tokens > 0:
        budget = total_tokens - fixed
        if weighted and budget <= 0:
            raise InputError(
                f"mixture.total_tokens={total_tokens} leaves nothing for the weighted sources: the epoch-based "
                f"sources already take {fixed:,.0f} tokens"
            )
    else:
        budget = sum(m.train_tokens for m in weighted)
    requested_total = fixed + (budget if weighted else 0)
    for m in mixes:
        if m.epochs > 0:
            m.target_tokens = m.epochs * m.train_tokens
        else:
            wanted = budget * m.weight / weight_sum
            m.requested_share = wanted / requested_total if requested_total else 0.0
            m.capped = wanted > max_epochs * m.train_tokens
            m.target_tokens = min(wanted, max_epochs * m.train_tokens)
            continue
        m.requested_share = m.target_tokens / requested_total if requested_total else 0.0


def sample_documents(doc_tokens: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Indices into ``doc_tokens`` (repeats allowed) whose tokens add up to ``target`` (over by < one document)."""
    available = int(doc_tokens.sum())
    if available == 0 or target <= 0:
        return np.zeros(0, dtype=np.int64)
    passes = int(target // available)
    rest = target - passes * available
    chosen = [np.arange(len(doc_tokens))] * passes
    if rest > 0:
        order = rng.permutation(len(doc_tokens))
        cumulative = np.cumsum(doc_tokens[order])
        chosen.append(order[: int(np.searchsorted(cumulative, rest)) + 1])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


class _TokenSource:
    """Reads a document's tokens from its shard's tokens.bin (memory-mapped, opened once)."""

    def __init__(self, catalog: Catalog, dtype: np.dtype) -> None:
        self.catalog, self.dtype = catalog, dtype
        self.maps: dict[int, np.ndarray] = {}

    def get(self, doc: int) -> np.ndarray:
        shard = int(self.catalog.shard[doc])
        if shard not in self.maps:
            path = Path(f"{self.catalog.prefixes[shard]}.tokens.bin")
            self.maps[shard] = np.memmap(path, dtype=self.dtype, mode="r") if path.stat().st_size else np.zeros(0)
        start = int(self.catalog.offset[doc])
        return self.maps[shard][start : start + int(self.catalog.tokens[doc])]


def build_mixture(
    catalog: Catalog,
    kept: np.ndarray,
    sources: list[tuple[str, float, float]],
    tokenizer: Any,
    out_dir: str | Path,
    *,
    total_tokens: int = 0,
    val_fraction: float = 0.01,
    max_epochs: float = 10.0,
    shard_tokens: int = 50_000_000,
    seed: int = 0,
    inputs: list[str] | None = None,
) -> tuple[list[SourceMix], dict[str, Any]]:
    """Write ``out_dir`` (train/val shards + meta.json) from the ``kept`` documents of ``catalog``.

    ``sources`` is ``(name, weight, epochs)`` per config source. Returns the per-source mixture and the meta dict.
    """
    is_val = catalog.val < val_fraction
    kept_ids = np.flatnonzero(kept)
    if len(kept_ids) >= 2 and not is_val[kept_ids].any():  # like prepare: both splits get at least one document
        is_val[kept_ids[np.argmin(catalog.val[kept_ids])]] = True
    if len(kept_ids) >= 2 and is_val[kept_ids].all():
        is_val[kept_ids[np.argmax(catalog.val[kept_ids])]] = False
    if len(kept_ids) == 0:
        raise InputError("no document survived the pipeline: nothing to write (see the report for why)")
    mixes = []
    for index, (name, weight, epochs) in enumerate(sources):
        mine = kept & (catalog.source == index)
        train, val = mine & ~is_val, mine & is_val
        mixes.append(
            SourceMix(
                name,
                weight,
                epochs,
                int(train.sum()),
                int(catalog.tokens[train].sum()),
                int(val.sum()),
                int(catalog.tokens[val].sum()),
            )
        )
    plan_targets(mixes, total_tokens, max_epochs)
    rng = np.random.default_rng([seed, 0x313])
    picked: list[np.ndarray] = []
    for index, mix in enumerate(mixes):
        docs = np.flatnonzero(kept & ~is_val & (catalog.source == index))
        chosen = docs[sample_documents(catalog.tokens[docs], mix.target_tokens, rng)]
        mix.sampled_docs, mix.sampled_tokens = len(chosen), int(catalog.tokens[chosen].sum())
        picked.append(chosen)
    train_order = rng.permutation(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    realised = sum(m.sampled_tokens for m in mixes)
    for mix in mixes:
        mix.realised_share = mix.sampled_tokens / realised if realised else 0.0
    val_order = np.flatnonzero(kept & is_val)
    meta = _write_splits(
        catalog, {"train": train_order, "val": val_order}, tokenizer, Path(out_dir), shard_tokens, seed, val_fraction
    )
    meta["pipeline_inputs"] = inputs or []
    _write_json_atomic(Path(out_dir) / META_FILE, meta)
    return mixes, meta


def _write_splits(
    catalog: Catalog,
    orders: dict[str, np.ndarray],
    tokenizer: Any,
    out_dir: Path,
    shard_tokens: int,
    seed: int,
    val_fraction: float,
) -> dict[str, Any]:
    _claim_output_dir(out_dir, overwrite=True)  # the pipeline owns its tokens/ directory; re-runs replace it
    dtype = token_dtype(tokenizer.vocab_size)
    reader = _TokenSource(catalog, dtype)
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    try:
        for split in SPLITS:
            for doc in orders[split]:
                writers[split].write(np.asarray(reader.get(int(doc))))
                writers[split].write(eod)
        shards = {split: writer.commit() for split, writer in writers.items()}
        documents = {split: len(orders[split]) for split in SPLITS}
        meta = _build_meta(tokenizer, dtype, shards, documents, ReadStats(), [], val_fraction, seed, shard_tokens)
        _copy_atomic(tokenizer.path, out_dir / TOKENIZER_FILE)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return meta


def mixture_table(mixes: list[SourceMix]) -> list[dict[str, Any]]:
    return [
        {
            "source": m.name,
            "weight": m.weight,
            "epochs_requested": m.epochs,
            "train_docs_available": m.train_docs,
            "train_tokens_available": m.train_tokens,
            "requested_share": round(m.requested_share, 4),
            "target_tokens": int(math.ceil(m.target_tokens)),
            "capped_by_max_epochs": m.capped,
            "sampled_docs": m.sampled_docs,
            "sampled_tokens": m.sampled_tokens,
            "realised_share": round(m.realised_share, 4),
            "realised_epochs": round(m.realised_epochs, 3),
            "val_docs": m.val_docs,
            "val_tokens": m.val_tokens,
        }
        for m in mixes
    ]
