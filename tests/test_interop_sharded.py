"""A sharded checkpoint (two gloo ranks, FSDP2, torch.distributed.checkpoint) exports straight to Hugging Face
files, identical to the export of the same weights from one process, holding one output shard's sources at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from interop_models import random_model, tiny_config, write_checkpoint
from sparselm.checkpoint.files import DCP_DIR
from sparselm.config import to_toml
from sparselm.data.tokenizer import Tokenizer
from sparselm.interop.hf_export import export_hf

MOE = {"num_experts": 4, "top_k": 2, "moe_every": 1}


def _save_sharded(rank: int, world: int, port: int, vocab: int, path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from sparselm.checkpoint.sharded import save_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = tiny_config(vocab, moe=MOE)
    model = random_model(cfg, seed=11)  # the same weights on every rank, then each keeps its shard
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    save_sharded(Path(path), model)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_checkpoint_exports_directly(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_tokenizer.vocab_size, moe=MOE)
    ckpt = tmp_path / "step_00000007"
    ckpt.mkdir()
    mp.start_processes(
        _save_sharded,
        args=(2, _free_port(), tiny_tokenizer.vocab_size, str(ckpt / DCP_DIR)),
        nprocs=2,
        start_method="spawn",
    )
    (ckpt / "config.toml").write_text(to_toml(cfg))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 7, "format": "dcp"}))
    (ckpt / "tokenizer.model").write_bytes(tiny_tokenizer.path.read_bytes())
    assert not (ckpt / "model.safetensors").exists()

    shard_limit = 60_000
    sharded = export_hf(ckpt, tmp_path / "from-dcp", max_shard_size=shard_limit)
    model = random_model(cfg, seed=11)
    single = export_hf(
        write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "single"),
        tmp_path / "from-one",
        max_shard_size=shard_limit,
    )
    assert sharded.shards == single.shards > 3
    names = sorted(p.name for p in (tmp_path / "from-one").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "from-dcp").glob("*.safetensors"))
    for name in names:
        a, b = load_file(str(tmp_path / "from-dcp" / name)), load_file(str(tmp_path / "from-one" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # Memory: the source tensors held at once (one output shard's) stay within the shard limit, or one tensor
    # when a single one is bigger (the embedding here): a fraction of the model, never the whole of it.
    total = sum(p.numel() * 4 for p in model.state_dict().values())
    biggest = max(p.numel() * 4 for p in model.state_dict().values())
    assert sharded.peak_loaded_bytes <= max(shard_limit, biggest)
    assert sharded.peak_loaded_bytes < total / 5
