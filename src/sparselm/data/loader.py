"""Batches from a prepared token directory (see ``sparselm.data.prepare``), resumable and layout-independent.

The token stream of a split (all its shards, in order) is cut into windows of ``seq_len + 1`` tokens with stride
``seq_len``: window ``w`` covers tokens ``[w * seq_len, w * seq_len + seq_len + 1)``. Consecutive windows share one
token, so every (input, target) pair of the stream is trained on exactly once per epoch and none is lost at window
edges. Windows ignore document boundaries; documents are separated by the eod token.

Training order: epoch ``e`` visits all windows in the permutation drawn from ``(seed, e)``. Step ``s`` takes the next
``global_batch_size`` windows of that order (continuing into the next epoch when one runs out), and rank ``r`` of
``W`` keeps rows ``[r * B / W, (r + 1) * B / W)``. The global batch therefore depends only on (seed, step), never on
the number of ranks, which is what keeps losses identical across data-parallel layouts.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparselm.data.prepare import FORMAT_VERSION, META_FILE
from sparselm.errors import InputError


class TokenShards:
    """Read-only, memory-mapped view of one split of a prepared directory as a single token array."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        meta_path = self.data_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.data_dir} is not a prepared dataset (no {META_FILE}); create it with `sparselm prepare`"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{meta_path} is not valid JSON ({exc}); re-run `sparselm prepare`") from None
        if self.meta.get("version") != FORMAT_VERSION:
            raise InputError(
                f"{meta_path}: format version {self.meta.get('version')} is not supported (expected {FORMAT_VERSION})"
            )
        splits = self.meta["splits"]
        if split not in splits:
            raise InputError(f"{self.data_dir} has no split {split!r}; available: {', '.join(splits)}")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.eod_id: int = int(self.meta["eod_id"])
        self.vocab_size: int = int(self.meta["vocab_size"])

        self._arrays: list[np.memmap] = []
        self._offsets = [0]  # start of each shard in the split's token stream, then the total
        for shard in splits[split]["shards"]:
            if shard["tokens"] == 0:
                continue  # np.memmap cannot map an empty file
            path = self.data_dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                size = path.stat().st_size if path.is_file() else "missing"
                raise InputError(f"{path}: expected {expected} bytes per {META_FILE}, found {size}; re-run prepare")
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._offsets.append(self._offsets[-1] + shard["tokens"])
        self.num_tokens: int = self._offsets[-1]
        if self.num_tokens == 0:
            raise InputError(f"split {split!r} of {self.data_dir} is empty; prepare more data or a larger val_fraction")

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.meta["tokenizer"]["file"]

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split as a fresh array, reading across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) is outside the split's {self.num_tokens} tokens")
        out = np.empty(length, dtype=self.dtype)
        shard = bisect.bisect_right(self._offsets, start) - 1
        filled = 0
        while filled < length:
            local = start + filled - self._offsets[shard]
            take = min(length - filled, len(self._arrays[shard]) - local)
            out[filled : filled + take] = self._arrays[shard][local : local + take]
            filled += take
            shard += 1
        return out


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in the stream."""
    return max(0, (num_tokens - 1) // seq_len)


def _check_fits(shards: TokenShards, seq_len: int) -> int:
    if seq_len < 1:
        raise InputError(f"seq_len must be >= 1, got {seq_len}")
    count = num_windows(shards.num_tokens, seq_len)
    if count == 0:
        raise InputError(
            f"split {shards.split!r} has {shards.num_tokens} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; use a shorter seq_len or more data"
        )
    return count


def _to_batch(shards: TokenShards, windows: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    for row, w in enumerate(windows):
        rows[row] = shards.window(w * seq_len, seq_len + 1)
    data = torch.from_numpy(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class BatchSampler:
    """Endless, resumable sequence of (inputs, targets) batches for one rank; see the module docstring for order."""

    def __init__(
        self, shards: TokenShards, seq_len: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch_size < 1:
            raise InputError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not valid for world_size {world_size}")
        if global_batch_size % world_size != 0:
            raise InputError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}")
        self.shards = shards
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.num_windows = _check_fits(shards, seq_len)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # position in the current epoch's permutation
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        # One int64 per window (8 bytes per seq_len tokens): 40 MB for 1.3 B tokens at seq_len 256; cached per epoch.
        if self._order_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order = rng.permutation(self.num_windows)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def _take_global(self) -> list[int]:
        """The next global batch's window ids, advancing epoch and cursor (every rank does the same)."""
        windows: list[int] = []
        while len(windows) < self.global_batch_size:
            order = self._permutation(self.epoch)
            take = min(self.global_batch_size - len(windows), self.num_windows - self.cursor)
            windows.extend(order[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return windows

    def next_windows(self) -> list[int]:
        """This rank's window ids of the next global batch."""
        windows = self._take_global()
        local = self.local_batch_size
        return windows[self.rank * local : (self.rank + 1) * local]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: int64 (inputs, targets), each [local_batch_size, seq_len]."""
        return _to_batch(self.shards, self.next_windows(), self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where ``state`` was taken. The world size may differ; the data and seq_len may not."""
        if int(state["seq_len"]) != self.seq_len or int(state["num_windows"]) != self.num_windows:
            raise InputError(
                f"sampler state is for seq_len={state['seq_len']} over {state['num_windows']} windows, but this "
                f"sampler has seq_len={self.seq_len} over {self.num_windows} windows (different data or seq_len?)"
            )
        if not 0 <= int(state["cursor"]) < self.num_windows:
            raise InputError(f"sampler state cursor {state['cursor']} is outside [0, {self.num_windows})")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order_epoch = -1  # the seed may have changed: never reuse a cached permutation


def eval_batches(
    shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential windows from the start of the split, the same every call: ``max_batches`` batches (None = all).

    The last batch holds fewer than ``batch_size`` rows when the split runs out of windows.
    """
    for windows in eval_windows(shards, seq_len, batch_size, max_batches):
        yield _to_batch(shards, windows, seq_len)


def eval_windows(
    shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[list[int]]:
    """The window ids of each batch of ``eval_batches``."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    count = _check_fits(shards, seq_len)
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    for first in range(0, count, batch_size):
        yield list(range(first, min(first + batch_size, count)))
