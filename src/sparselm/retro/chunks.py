"""Cut a prepared split's token stream into retrieval chunks: m tokens, their continuation, documents and bytes.

Chunk i of a split is tokens ``[i * m, (i + 1) * m)`` of its stream (all shards in order, documents separated by
eod), so chunk boundaries line up with the training windows whenever ``data.seq_len`` is a multiple of m: window w
holds chunks ``w * seq_len / m + u``. Its continuation is the next m tokens (eod past the end of the stream). Every
chunk records:

- ``doc_first`` / ``doc_last``: the documents (numbered from 0 within the split) of the chunk's first token and of
  its continuation's last token. Retrieval excludes a neighbour whose range meets the query's range, so neither the
  chunk nor the text it helps predict can be copied from the same document (the paper's leakage rule);
- ``byte_start``: where the chunk starts in document ``doc_first``, in UTF-8 bytes, and ``n_bytes``, its length
  (the byte span used for attribution and for bits per byte).

Byte lengths come from the tokenizer's pieces (identity normalisation, no dummy prefix, byte fallback: a token's
bytes are exactly its piece's), so no text is decoded here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparselm.data.loader import TokenShards

CHUNK_FIELDS = np.dtype(
    [
        ("source", "<i4"),  # index into the database's sources
        ("position", "<i8"),  # chunk index in its source split
        ("doc_first", "<i8"),
        ("doc_last", "<i8"),
        ("byte_start", "<i8"),
        ("n_bytes", "<i8"),
    ]
)


def token_byte_lengths(tokenizer_path: str | Path) -> np.ndarray:
    """UTF-8 bytes of every token id ([vocab] int64): 1 for a byte-fallback piece, 0 for control pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(len(lengths)):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        if sp.is_byte(i):
            lengths[i] = 1
            continue
        lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def num_chunks(shards: TokenShards, m: int) -> int:
    return shards.num_tokens // m


@dataclass
class ChunkBlock:
    start: int  # index of the first chunk of the block
    tokens: np.ndarray  # [n, 2m] chunk + continuation
    fields: np.ndarray  # [n] CHUNK_FIELDS (source = 0: the caller sets it)


def iter_chunks(shards: TokenShards, m: int, byte_lengths: np.ndarray, block: int = 1 << 16) -> Iterator[ChunkBlock]:
    """Every chunk of ``shards`` in order, ``block`` chunks at a time (memory: a few arrays of block * m)."""
    total = num_chunks(shards, m)
    eod = shards.eod_id
    docs_before = 0  # eod tokens before the block's first token
    carry = 0  # bytes of the current document before the block's first token
    for start in range(0, total, block):
        n = min(block, total - start)
        first = start * m
        span = min((n + 1) * m, shards.num_tokens - first)  # the chunks and the last one's continuation
        stream = shards.window(first, span).astype(np.int64)
        is_eod = stream == eod
        eods_before = np.cumsum(is_eod) - is_eod  # eods strictly before each position, within the block
        doc = docs_before + eods_before
        lengths = byte_lengths[stream]
        before = np.cumsum(lengths) - lengths  # bytes before each position, within the block
        # Offset inside the document: bytes since the position after the latest eod (or since the document start).
        base = np.full(span, np.iinfo(np.int64).min, dtype=np.int64)
        base[0] = -carry
        starts = np.flatnonzero(is_eod[:-1]) + 1
        base[starts] = before[starts]
        offset = before - np.maximum.accumulate(base)

        tokens = np.full((n, 2 * m), eod, dtype=stream.dtype)
        chunk_tokens = stream[: n * m].reshape(n, m)
        tokens[:, :m] = chunk_tokens
        continuation = stream[m:]
        full = min(n, len(continuation) // m)
        tokens[:full, m:] = continuation[: full * m].reshape(full, m)
        if full < n:  # the stream's last chunk: a short continuation, eod-padded
            tail = continuation[full * m :]
            tokens[full, m : m + len(tail)] = tail

        fields = np.zeros(n, dtype=CHUNK_FIELDS)
        fields["position"] = np.arange(start, start + n)
        fields["doc_first"] = doc[np.arange(n) * m]
        last = np.minimum(np.arange(n) * m + 2 * m - 1, span - 1)
        fields["doc_last"] = doc[last]
        fields["byte_start"] = offset[np.arange(n) * m]
        fields["n_bytes"] = lengths[: n * m].reshape(n, m).sum(1)
        yield ChunkBlock(start, tokens.astype(shards.dtype), fields)

        docs_before += int(is_eod[: n * m].sum())
        tail_offset = offset[n * m - 1] + lengths[n * m - 1]
        carry = 0 if is_eod[n * m - 1] else int(tail_offset)


def chunk_texts(tokenizer, tokens: np.ndarray, m: int) -> list[str]:
    """The text of each chunk (its first m tokens; eod decodes to nothing)."""
    return [tokenizer.decode(row[:m]) for row in tokens]
