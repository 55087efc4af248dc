"""What ``sparselm train`` needs for a ``[retro]`` run: neighbours with every batch, and RETRO-fitting.

Training windows and query chunks are cut from the same stream at multiples of m (``data.seq_len`` must be a multiple
of ``retro.chunk_size``), so window w's chunk u is query chunk ``w * seq_len / m + u`` of the precomputed table and
its neighbours are read from the memory-mapped database with the batch; every data-parallel rank reads its own rows.

RETRO-fitting (``retro.init_from`` + ``retro.freeze_base``): the decoder starts from a trained checkpoint without
retrieval, and only the neighbour encoder and the cross-attention sublayers train. Since those sublayers are
skipped without neighbours, the fitted model without retrieval is the base model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from sparselm.config import Config
from sparselm.data.loader import BatchSampler, TokenShards, _to_batch, eval_windows
from sparselm.errors import CheckpointError, ConfigError
from sparselm.model.retro import freeze_decoder, is_retrieval_parameter
from sparselm.retro.neighbours import load_neighbours
from sparselm.retro.store import Database
from sparselm.train.trainer import AfterBackward, DataSource, TrainResult
from sparselm.train.trainer import train as train_plain


def load_base(model: nn.Module, cfg: Config) -> None:
    """Copy a trained non-retrieval checkpoint into every non-RETRO parameter of ``model`` (RETRO-fitting)."""
    from sparselm.checkpoint.files import _read_weights, load_config_from_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(cfg.retro.init_from)
    base = load_config_from_checkpoint(ckpt)
    if base.retro.enabled:
        raise ConfigError(f"retro.init_from={ckpt} has retrieval layers; RETRO-fitting starts from a plain model")
    for section in ("model", "moe"):
        if getattr(base, section) != getattr(cfg, section):
            theirs, ours = vars(getattr(base, section)), vars(getattr(cfg, section))
            diff = [k for k in ours if theirs.get(k) != ours[k]]
            raise ConfigError(
                f"retro.init_from={ckpt}: its [{section}] differs from this config in {', '.join(diff[:4])}"
            )
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: RETRO-fitting reads model.safetensors; `sparselm export` a sharded checkpoint")
    weights = _read_weights(ckpt)
    own = {n for n in model.state_dict() if not is_retrieval_parameter(n)}
    if set(weights) != own:
        missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
        raise CheckpointError(
            f"{ckpt}: weights do not match the decoder (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict(weights, strict=False)


class RetroData:
    """The database and the neighbour tables of the run's train and val splits, checked against the config."""

    def __init__(self, cfg: Config) -> None:
        r, data = cfg.retro, cfg.data
        if not r.db:
            raise ConfigError("retro.db is not set: build a database with `sparselm retro build-db` and point to it")
        if data.seq_len % r.chunk_size:
            raise ConfigError(f"data.seq_len={data.seq_len} is not a multiple of retro.chunk_size={r.chunk_size}")
        self.db = Database(r.db)
        shards = TokenShards(data.path, "train")
        self.db.check_model(shards.tokenizer_path, r.chunk_size)
        self.k = r.neighbours
        self.chunks_per_window = data.seq_len // r.chunk_size
        self.tables = {split: load_neighbours(self.db, data.path, split, self.k) for split in ("train", "val")}

    def neighbours(self, split: str, windows: list[int]) -> torch.Tensor:
        """[len(windows), chunks per window, k, 2m] neighbour tokens of the given windows of ``split``."""
        c = self.chunks_per_window
        chunk_ids = (np.asarray(windows, dtype=np.int64)[:, None] * c + np.arange(c)).reshape(-1)
        ids = self.tables[split][chunk_ids, : self.k].reshape(len(windows), c, self.k)
        return torch.from_numpy(self.db.neighbour_tokens(ids))

    def eval_batches(self, shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None) -> Iterator:
        """``data.loader.eval_batches`` with each batch's neighbours: (inputs, targets, neighbours)."""
        for windows in eval_windows(shards, seq_len, batch_size, max_batches):
            yield (*_to_batch(shards, windows, seq_len), self.neighbours(shards.split, windows))


class RetroBatchSampler(BatchSampler):
    """``BatchSampler`` whose batches are (inputs, targets, neighbours [rows, seq_len / m, k, 2m])."""

    def __init__(self, retro: RetroData, shards: TokenShards, *args, **kwargs) -> None:
        super().__init__(shards, *args, **kwargs)
        self.retro = retro

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        windows = self.next_windows()
        return (*_to_batch(self.shards, windows, self.seq_len), self.retro.neighbours("train", windows))


class RetroSource(DataSource):
    """The trainer's data source for a ``[retro]`` run: batches with neighbours, and RETRO-fitting (the base
    decoder loaded from ``retro.init_from`` and, with ``retro.freeze_base``, frozen) before training starts."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.retro = RetroData(cfg)

    def prepare(self, model):
        if self.cfg.retro.init_from:
            load_base(model, self.cfg)
        if self.cfg.retro.freeze_base:
            freeze_decoder(model)
        return model

    def sampler(self, shards: TokenShards, *args) -> RetroBatchSampler:
        return RetroBatchSampler(self.retro, shards, *args)

    def eval_batches(self, shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None) -> Iterator:
        return self.retro.eval_batches(shards, seq_len, batch_size, max_batches)


def train(cfg: Config, run_dir, resume: bool = False, after_backward: AfterBackward | None = None) -> TrainResult:
    """``sparselm train`` for any config: a ``[retro]`` one trains with its neighbours."""
    return train_plain(cfg, run_dir, resume, after_backward, RetroSource(cfg) if cfg.retro.enabled else None)
