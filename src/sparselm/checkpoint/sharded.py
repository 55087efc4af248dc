"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable by any layout and by one process.

What is saved is layout-free: model and optimizer state keyed by parameter name (FQN) with global shapes, as
``get_model_state_dict`` / ``get_optimizer_state_dict`` give them for FSDP2, DTensor TP and plain modules alike
(ZeRO-1 produces the same format itself). Each rank writes the pieces it owns; on load DCP reads whatever
overlaps the pieces the new layout owns, so 4 ranks (dp_shard=2 x tp=2) -> 2 ranks -> 1 process just works.

Single-process checkpoints (``model.safetensors`` + ``optimizer.pt``) load into a parallel job too: the full
tensors are handed to ``set_*_state_dict(full_state_dict=True)``, which keeps each rank's part.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sparselm.parallel.zero1 import ZeroStage1


def _optimizer_state(model: nn.Module, optimizer) -> dict:
    if isinstance(optimizer, ZeroStage1):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer)


def _dcp_load(state: dict, path: Path) -> None:
    if dist.is_initialized():
        dcp.load(state, checkpoint_id=str(path))
        return
    with warnings.catch_warnings():
        # DCP warns that it "assumes" a single process: that is exactly the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def save_sharded(path: Path, model: nn.Module, optimizer=None) -> None:
    """Collective: every rank calls it with the same ``path`` (on a file system all ranks see)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = _optimizer_state(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer=None) -> None:
    """Collective in a job, plain in one process: fill this rank's parameters (and optimizer state) from ``path``."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = _optimizer_state(model, optimizer)
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is None:
        return
    if isinstance(optimizer, ZeroStage1):
        optimizer.load_state_dict(state["optim"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optim"])


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


def load_full(model: nn.Module, optimizer, weights: dict[str, torch.Tensor], optim_state: dict | None) -> None:
    """Load full (single-process) tensors into a parallel model; every rank passes the same full state."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is None or optim_state is None:
        return
    if isinstance(optimizer, ZeroStage1):
        optimizer.load_state_dict(optim_state)
    else:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def load_model_from_dcp(model: nn.Module, path: Path) -> None:
    """Load only the weights of a DCP checkpoint into a plain single-process model (generation, export)."""
    state = {"model": model.state_dict()}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])
