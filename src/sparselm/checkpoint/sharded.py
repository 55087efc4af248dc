"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable by any layout and by one process.

What is saved is layout-free: model and optimizer state keyed by parameter name (FQN) with global shapes, as
``get_model_state_dict`` gives them for FSDP2, DTensor TP and plain modules alike (the runtime that built the
optimizer gives its state in the same form, ZeRO-1 included). Each rank writes the pieces it owns; on load DCP reads
whatever overlaps the pieces the new layout owns, so 4 ranks (dp_shard=2 x tp=2) -> 2 ranks -> 1 process just works.

Single-process checkpoints (``model.safetensors`` + ``optimizer.pt``) load into a parallel job too: the full
tensors are handed to ``set_*_state_dict(full_state_dict=True)``, which keeps each rank's part.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

if TYPE_CHECKING:
    from sparselm.parallel.runtime import Runtime


def _dcp_load(state: dict, path: Path) -> None:
    if dist.is_initialized():
        dcp.load(state, checkpoint_id=str(path))
        return
    with warnings.catch_warnings():
        # DCP warns that it "assumes" a single process: that is exactly the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def save_sharded(path: Path, model: nn.Module, optimizer_state: dict | None = None) -> None:
    """Collective: every rank calls it with the same ``path`` (on a file system all ranks see)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer_state is not None:
        state["optim"] = optimizer_state
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer=None, runtime: Runtime | None = None) -> None:
    """Collective in a job, plain in one process: fill this rank's parameters (and, given the ``runtime`` that built
    ``optimizer``, its state) from ``path``."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = runtime.sharded_optimizer_state(model, optimizer)
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        runtime.load_sharded_optimizer_state(model, optimizer, state["optim"], full=False)


def named_optimizer_state(indexed: dict, names_in_order: list[list[str]]) -> dict:
    """Turn ``optimizer.state_dict()`` (parameters numbered) into the FQN-keyed form, given the names of each
    param group's parameters in the order the optimizer was built with."""
    index_to_name = {}
    for group, names in zip(indexed["param_groups"], names_in_order, strict=True):
        for index, name in zip(group["params"], names, strict=True):
            index_to_name[index] = name
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": names}
        for g, names in zip(indexed["param_groups"], names_in_order, strict=True)
    ]
    state = {index_to_name[i]: dict(s) for i, s in indexed["state"].items()}
    return {"state": state, "param_groups": groups}


def load_full(
    model: nn.Module, optimizer, weights: dict[str, torch.Tensor], optim_state: dict | None, runtime: Runtime
) -> None:
    """Load full (single-process) tensors into a parallel model; every rank passes the same full state."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_state is not None:
        runtime.load_sharded_optimizer_state(model, optimizer, optim_state, full=True)


def load_model_from_dcp(model: nn.Module, path: Path) -> None:
    """Load only the weights of a DCP checkpoint into a plain single-process model (generation, export)."""
    state = {"model": model.state_dict()}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])


def model_tensor_metadata(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """(global shape, dtype) of every model tensor in a DCP checkpoint, from its metadata alone (no tensor read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {
        key.removeprefix("model."): (item.size, item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }


def load_model_tensors(path: Path, names: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Read only the named model tensors (whole, every rank's pieces) of a DCP checkpoint into one process."""
    state = {"model": {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in names.items()}}
    _dcp_load(state, path)
    return state["model"]
