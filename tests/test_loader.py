"""Token shards and batch sampling: cross-shard windows, determinism, exact resume, layout independence, epochs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparselm.data.loader import BatchSampler, TokenShards, eval_batches, num_windows
from sparselm.data.prepare import prepare
from sparselm.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def train(tiny_dataset: Path) -> TokenShards:
    return TokenShards(tiny_dataset, "train")


def reference_stream(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    shards = meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=meta["dtype"]) for s in shards])


def batches(sampler: BatchSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(n)]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True)
    )


def test_token_shards_attributes(tiny_dataset: Path, train: TokenShards, tiny_tokenizer: Tokenizer) -> None:
    assert len(train.meta["splits"]["train"]["shards"]) > 3  # the fixture uses small shards on purpose
    assert train.num_tokens == len(train) == train.meta["splits"]["train"]["tokens"]
    assert (train.eod_id, train.vocab_size) == (tiny_tokenizer.eod_id, tiny_tokenizer.vocab_size)
    assert train.tokenizer_path == tiny_dataset / "tokenizer.model"
    val = TokenShards(tiny_dataset, "val")
    assert val.num_tokens > 0 and train.window(0, 10).dtype == np.uint16


def test_window_reads_across_shard_boundaries(tiny_dataset: Path, train: TokenShards) -> None:
    stream = reference_stream(tiny_dataset, "train")
    shard = train.meta["splits"]["train"]["shards"][0]["tokens"]
    cases = [(0, 1), (0, 100), (shard - 3, 6), (shard - 1, 2 * shard + 5), (train.num_tokens - 7, 7), (5, 0)]
    cases.append((0, train.num_tokens))  # the whole split in one read
    for start, length in cases:
        window = train.window(start, length)
        assert np.array_equal(window, stream[start : start + length]), (start, length)
    for start, length in [(-1, 2), (train.num_tokens - 1, 2), (0, train.num_tokens + 1)]:
        with pytest.raises(IndexError):
            train.window(start, length)


def test_token_shards_errors(tiny_dataset: Path, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenShards(tmp_path, "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenShards(tiny_dataset, "test")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    with open(broken / "train_00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="train_00001.bin: expected"):
        TokenShards(broken, "train")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("A single document goes to a single split.\n")
    meta = prepare([tmp_path / "one"], tiny_tokenizer.path, tmp_path / "single", progress=False)
    empty = "val" if meta["splits"]["val"]["documents"] == 0 else "train"
    with pytest.raises(ValueError, match=f"split '{empty}' .* is empty"):
        TokenShards(tmp_path / "single", empty)


def test_batches_are_shifted_int64_windows(train: TokenShards) -> None:
    seq_len = 16
    x, y = BatchSampler(train, seq_len, global_batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, seq_len) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < train.vocab_size
    for row in range(4):  # every row is a stride-seq_len window of the stream
        starts = [w * seq_len for w in range(num_windows(train.num_tokens, seq_len))]
        assert any(np.array_equal(x[row].numpy(), train.window(s, seq_len)) for s in starts)


def test_sampler_is_deterministic(train: TokenShards) -> None:
    a = batches(BatchSampler(train, 32, 8, seed=1), 5)
    assert same(a, batches(BatchSampler(train, 32, 8, seed=1), 5))
    assert not same(a, batches(BatchSampler(train, 32, 8, seed=2), 5))


def test_state_dict_resume_gives_identical_batches(train: TokenShards) -> None:
    seq_len, batch = 64, 8
    windows = num_windows(train.num_tokens, seq_len)
    steps = windows // batch + 3  # the resumed stretch crosses an epoch boundary
    sampler = BatchSampler(train, seq_len, batch, seed=7)
    batches(sampler, steps - 4)
    state = sampler.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = batches(sampler, 6)
    assert sampler.epoch == 1
    resumed = BatchSampler(train, seq_len, batch, seed=999)  # the seed comes from the state
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert same(batches(resumed, 6), expected)
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(train, 32, batch, seed=7).load_state_dict(state)


def test_global_batch_is_independent_of_world_size(train: TokenShards) -> None:
    seq_len, global_batch, steps = 32, 8, 40  # 40 steps wrap around the epoch
    single = batches(BatchSampler(train, seq_len, global_batch, seed=3), steps)
    for world in (2, 4):
        ranks = [BatchSampler(train, seq_len, global_batch, seed=3, rank=r, world_size=world) for r in range(world)]
        for step in range(steps):
            parts = [r.next_batch() for r in ranks]
            assert all(x.shape == (global_batch // world, seq_len) for x, _ in parts)
            assert torch.equal(torch.cat([x for x, _ in parts]), single[step][0])
            assert torch.equal(torch.cat([y for _, y in parts]), single[step][1])


def test_every_epoch_visits_every_window_once(train: TokenShards) -> None:
    seq_len = 256
    n = num_windows(train.num_tokens, seq_len)
    batch = next(b for b in (7, 11, 13, 17) if n % b)  # so that epochs end in the middle of a batch
    window_of = {train.window(w * seq_len, seq_len + 1).tobytes(): w for w in range(n)}
    assert len(window_of) == n
    sampler = BatchSampler(train, seq_len, batch, seed=0)
    seen: list[int] = []
    while len(seen) < 3 * n:
        x, y = sampler.next_batch()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.uint16)
        seen.extend(window_of[row.tobytes()] for row in rows)
    epochs = [seen[:n], seen[n : 2 * n], seen[2 * n : 3 * n]]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh permutation per epoch
    assert sampler.epoch == len(seen) // n


def test_batch_larger_than_an_epoch(train: TokenShards) -> None:
    seq_len = 2048
    n = num_windows(train.num_tokens, seq_len)
    sampler = BatchSampler(train, seq_len, global_batch_size=3 * n + 1, seed=0)
    x, _ = sampler.next_batch()
    assert x.shape[0] == 3 * n + 1 and sampler.epoch == 3 and sampler.cursor == 1


def test_sampler_errors(train: TokenShards) -> None:
    with pytest.raises(ValueError, match="not divisible by world_size"):
        BatchSampler(train, 16, 6, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not valid"):
        BatchSampler(train, 16, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one window"):
        BatchSampler(train, train.num_tokens, 4, seed=0)
    BatchSampler(train, train.num_tokens - 1, 4, seed=0)  # exactly one window fits


def test_eval_batches_are_sequential_and_repeatable(train: TokenShards) -> None:
    seq_len, batch = 32, 4
    first = list(eval_batches(train, seq_len, batch, max_batches=3))
    assert len(first) == 3 and same(first, list(eval_batches(train, seq_len, batch, max_batches=3)))
    x, y = first[1]
    assert np.array_equal(x[0].numpy(), train.window(4 * seq_len, seq_len))  # window 4 starts batch 1
    assert np.array_equal(y[-1].numpy(), train.window(7 * seq_len + 1, seq_len))
    everything = list(eval_batches(train, seq_len, batch, max_batches=None))
    n = num_windows(train.num_tokens, seq_len)
    assert sum(len(x) for x, _ in everything) == n and len(everything) == -(-n // batch)
    with pytest.raises(ValueError, match="fewer than one window"):
        next(eval_batches(train, train.num_tokens, batch, max_batches=1))
