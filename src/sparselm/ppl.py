"""Perplexity of a checkpoint on a text file or a prepared dataset split (non-overlapping windows)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparselm.errors import InputError
from sparselm.model.transformer import Transformer
from sparselm.precision import autocast


@dataclass
class PerplexityResult:
    tokens: int  # predicted tokens
    loss: float  # mean nats per token
    perplexity: float
    bytes: int | None = None  # UTF-8 bytes of the text, when known
    bits_per_byte: float | None = None


@torch.inference_mode()
def token_perplexity(
    model: Transformer,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    precision: str = "fp32",
    max_windows: int = 0,
    progress: bool = True,
) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over non-overlapping windows of ``seq_len`` (+1) tokens."""
    model.eval()
    stride = seq_len
    n_windows = max((len(tokens) - 1) // stride, 0)
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise InputError(f"need more than {seq_len} tokens for one window, got {len(tokens)}")
    total_nll, total_tokens = 0.0, 0
    starts = list(range(0, n_windows * stride, stride))
    for i in tqdm(range(0, len(starts), batch_size), desc="ppl", unit="batch", disable=not progress):
        chunk = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[i : i + batch_size]])
        batch = torch.from_numpy(chunk)
        with autocast(precision, batch.device):
            out = model(batch[:, :-1], batch[:, 1:])
        total_nll += out.loss.item() * batch[:, 1:].numel()
        total_tokens += batch[:, 1:].numel()
    return total_nll, total_tokens


def perplexity_of_text(
    model: Transformer, tokenizer, path: str | Path, seq_len: int, batch_size: int = 8, precision: str = "fp32"
) -> PerplexityResult:
    """Tokenise every document of a text/JSONL input (each followed by end-of-document) and score it."""
    from sparselm.data.reader import iter_documents

    ids: list[int] = []
    n_bytes = 0
    for doc in iter_documents([path]):
        ids.extend(tokenizer.encode(doc.text))
        ids.append(tokenizer.eod_id)
        n_bytes += len(doc.text.encode("utf-8"))
    nll, count = token_perplexity(model, np.asarray(ids), seq_len, batch_size, precision)
    # Bits per byte over the bytes actually scored (windows cover all but the ragged tail).
    scored_bytes = n_bytes * count / max(len(ids) - 1, 1)
    return PerplexityResult(count, nll / count, math.exp(nll / count), n_bytes, nll / math.log(2) / scored_bytes)


def perplexity_of_split(
    model: Transformer,
    data_dir: str | Path,
    split: str,
    seq_len: int,
    batch_size: int = 8,
    precision: str = "fp32",
    max_windows: int = 0,
) -> PerplexityResult:
    from sparselm.data.loader import TokenShards

    shards = TokenShards(data_dir, split)
    tokens = shards.window(0, shards.num_tokens)
    nll, count = token_perplexity(model, tokens, seq_len, batch_size, precision, max_windows)
    return PerplexityResult(count, nll / count, math.exp(nll / count))
