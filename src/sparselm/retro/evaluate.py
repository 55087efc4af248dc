"""Bits per byte of held-out documents with and without retrieval, per token, per chunk and by leakage.

The evaluation windows are ``seq_len``-token windows of a prepared split (``count`` of them, evenly spaced over the
split), cut like training windows so that their chunks are query chunks of the split's precomputed neighbour table.
Every target token is scored once; bits per byte = summed negative log-likelihood / ln 2 / UTF-8 bytes of the
target tokens (exact: the tokenizer's pieces are the text's bytes).

Leakage analysis (the paper's Sec. 4.4): the targets a chunk's neighbours serve are the next chunk's m tokens
(the causal shift), so for window chunk u (u + 1 < seq_len / m) the overlap of "evaluation chunk" u + 1 is the
longest run of tokens it shares with any of chunk u's neighbours (chunk + continuation), divided by m. Bits per
byte over the evaluation chunks whose overlap is at most 12.5%, 50% and 100% show how much of a gain is copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparselm.data.loader import TokenShards, _check_fits
from sparselm.precision import autocast
from sparselm.retro.chunks import token_byte_lengths

OVERLAP_BUCKETS = (0.125, 0.5, 1.0)


@dataclass
class EvalWindows:
    windows: np.ndarray  # [W] window indices in the split
    tokens: np.ndarray  # [W, seq_len + 1]
    target_bytes: np.ndarray  # [W, seq_len] UTF-8 bytes of each target token
    seq_len: int


def eval_windows(data_dir, split: str, seq_len: int, count: int) -> EvalWindows:
    shards = TokenShards(data_dir, split)
    total = _check_fits(shards, seq_len)
    windows = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))
    tokens = np.stack([shards.window(int(w) * seq_len, seq_len + 1).astype(np.int64) for w in windows])
    lengths = token_byte_lengths(shards.tokenizer_path)
    return EvalWindows(windows, tokens, lengths[tokens[:, 1:]], seq_len)


def window_neighbour_ids(table: np.ndarray, ev: EvalWindows, m: int, k: int) -> np.ndarray:
    """[W, seq_len / m, k] database ids of each window chunk's neighbours, from the split's table."""
    c = ev.seq_len // m
    chunk_ids = ev.windows[:, None] * c + np.arange(c)
    return np.asarray(table[chunk_ids.reshape(-1), :k]).reshape(len(ev.windows), c, k)


def shuffled(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """The control: every chunk gets the neighbours of another, random chunk of the evaluation set."""
    flat = ids.reshape(-1, ids.shape[-1])
    order = np.random.default_rng(seed).permutation(len(flat))
    return flat[order].reshape(ids.shape)


@torch.no_grad()
def token_nll(model, ev: EvalWindows, neighbour_tokens=None, batch_size: int = 8, precision: str = "fp32"):
    """[W, seq_len] float64 negative log-likelihood (nats) of every target token; ``neighbour_tokens`` is a
    function of window rows -> [rows, C, k, 2m] tokens (None: no retrieval)."""
    model.eval()
    device = model.tok_emb.weight.device
    out = np.empty((len(ev.windows), ev.seq_len), dtype=np.float64)
    for start in range(0, len(ev.windows), batch_size):
        rows = np.arange(start, min(start + batch_size, len(ev.windows)))
        batch = torch.from_numpy(ev.tokens[rows]).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        kwargs = {}
        if neighbour_tokens is not None:
            kwargs["neighbours"] = torch.from_numpy(neighbour_tokens(rows)).to(device)
        with autocast(precision, device):
            logits = model(x, **kwargs).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        out[rows] = nll.view(len(rows), -1).double().cpu().numpy()
    return out


def bits_per_byte(nll: np.ndarray, target_bytes: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        nll, target_bytes = nll[mask], target_bytes[mask]
    return float(nll.sum() / math.log(2) / max(int(target_bytes.sum()), 1))


def longest_common_run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Longest common contiguous run of tokens between rows: a [P, n], b [P, r] -> [P] int."""
    run = np.zeros((a.shape[0], b.shape[1] + 1), dtype=np.int32)
    best = np.zeros(a.shape[0], dtype=np.int32)
    for i in range(a.shape[1]):
        equal = a[:, i : i + 1] == b
        run = np.concatenate([np.zeros((a.shape[0], 1), np.int32), (run[:, :-1] + 1) * equal], axis=1)
        best = np.maximum(best, run.max(1))
    return best


def chunk_overlap(ev: EvalWindows, neighbour_tokens: np.ndarray, m: int) -> np.ndarray:
    """[W, C - 1] overlap ratio of evaluation chunk u + 1 with chunk u's neighbours ([W, C, k, 2m] tokens)."""
    W, C, k, r = neighbour_tokens.shape
    targets = ev.tokens[:, m : C * m].reshape(W, C - 1, m)  # chunk u + 1 of each window, u < C - 1
    a = np.repeat(targets.reshape(-1, m), k, axis=0)
    b = neighbour_tokens[:, : C - 1].reshape(-1, r)
    return longest_common_run(a, b).reshape(W, C - 1, k).max(-1) / m


def served_mask(ev: EvalWindows, m: int, chunk_overlaps: np.ndarray, limit: float) -> np.ndarray:
    """[W, seq_len] targets of the evaluation chunks (u + 1 for u < C - 1) whose overlap is <= ``limit``."""
    W, L = ev.tokens.shape[0], ev.seq_len
    mask = np.zeros((W, L), dtype=bool)
    chosen = chunk_overlaps <= limit
    for u in range(chunk_overlaps.shape[1]):
        # positions (u+1)m - 1 .. (u+2)m - 2 predict chunk u + 1's tokens
        mask[:, (u + 1) * m - 1 : (u + 2) * m - 1] = chosen[:, u : u + 1]
    return mask


def bootstrap_difference(
    nll_a: np.ndarray, nll_b: np.ndarray, target_bytes: np.ndarray, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of bpb(a) - bpb(b) resampling evaluation windows (paired: the same windows for both)."""
    rng = np.random.default_rng(seed)
    a, b, n = nll_a.sum(1), nll_b.sum(1), target_bytes.sum(1)
    picks = rng.integers(0, len(a), size=(samples, len(a)))
    diffs = (a[picks].sum(1) - b[picks].sum(1)) / math.log(2) / n[picks].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)
