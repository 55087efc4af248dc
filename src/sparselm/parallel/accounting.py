"""Measuring what a layout costs: model-state bytes held per rank, and bytes through each collective.

``model_state_bytes`` counts storages, not tensors: views (ZeRO-1 slices, FSDP's unsharded parameters inside one
all-gather buffer) are counted once, and storages FSDP has freed (resized to 0) not at all. A storage is known by
its identity, not its address, so fake tensors (``sparselm plan``: shapes without memory) are counted the same way.

``CommCounter`` is a TorchDispatchMode that sees every collective the process issues, whichever API issued it:
``torch.distributed`` calls (FSDP2, our ZeRO-1 and expert all-to-all) reach the dispatcher as ``c10d.*`` ops and
DTensor's as ``_c10d_functional.*`` ops. For each it records the payload and two derived figures:

- ``volume``: the ZeRO paper's convention (an all-reduce of S bytes moves 2S: reduce-scatter + all-gather; an
  all-gather or a reduce-scatter of a full tensor of S bytes moves S; an all-to-all moves its input);
- ``wire``: bytes one rank sends with ring algorithms: volume x (N - 1) / N, and for an all-to-all the part of
  the input addressed to other ranks.
Collectives over a single rank move nothing and are not counted. ``records`` adds them up per kind, ``by_group`` per
(kind, process group name).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    local = t._local_tensor if isinstance(t, DTensor) else t
    storage = local.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return storage._cdata, storage.nbytes()  # the storage object itself: views share it, fake tensors have one too


def model_state_storages(model: torch.nn.Module, optimizer) -> dict[str, dict[int, int]]:
    """Storages of parameters, gradients and optimizer state this rank holds right now: kind -> {storage: bytes}
    (each storage under the first kind it appears as)."""
    seen: set[int] = set()
    out: dict[str, dict[int, int]] = {"params": {}, "grads": {}, "optimizer": {}}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None or not torch.is_tensor(t):
            return
        key = _storage_key(t)
        if key is not None and key[0] not in seen:
            seen.add(key[0])
            out[kind][key[0]] = key[1]

    inner = getattr(optimizer, "optimizer", optimizer)  # ZeroStage1 wraps a torch optimizer
    params = list(model.parameters()) + [p for g in inner.param_groups for p in g["params"]]
    for p in params:
        add("params", p)
    for p in params:
        add("grads", p.grad)
    for p in model.parameters():
        add("grads", p.grad)  # a parameter's grad may be on the registered (unsharded) tensor
    for state in inner.state.values():
        for value in state.values():
            add("optimizer", value)
    return out


def model_state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds right now (each storage once)."""
    out = {kind: sum(storages.values()) for kind, storages in model_state_storages(model, optimizer).items()}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


@dataclass
class CommRecord:
    calls: int = 0
    payload: int = 0
    volume: int = 0
    wire: float = 0.0


def _group_of(args, kwargs) -> dist.ProcessGroup | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, dist.ProcessGroup):
            return a
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return dist.ProcessGroup.unbox(a)  # how c10d ops carry their group through the dispatcher
        if isinstance(a, str):
            try:
                return dist.distributed_c10d._resolve_process_group(a)
            except Exception:  # not a group name
                continue
    return None


def _tensors(x) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class CommCounter(TorchDispatchMode):
    """``with CommCounter() as c: ...`` then ``c.records`` maps a collective kind to its totals."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, CommRecord] = defaultdict(CommRecord)
        self.by_group: dict[tuple[str, str], CommRecord] = defaultdict(CommRecord)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = getattr(func, "namespace", "")
        if namespace in ("c10d", "_c10d_functional"):
            self._record(func.overloadpacket.__name__, namespace == "c10d", args, kwargs)
        return func(*args, **kwargs)

    def _record(self, name: str, c10d: bool, args, kwargs) -> None:
        group = _group_of(args, kwargs)
        n = group.size() if group is not None else 1
        if n <= 1 or name in ("wait_tensor", "barrier", "monitored_barrier"):
            return
        # c10d ops take (outputs, inputs, group, ...), except the in-place all-reduce and broadcast (tensors, ...);
        # functional ops take (input, ...).
        inputs = _tensors(args[1] if c10d and not name.startswith(("allreduce", "broadcast")) else args[0])
        payload = _nbytes(inputs)
        if "alltoall" in name or "all_to_all" in name:
            kind, volume = "all_to_all", payload
            splits = args[4] if c10d else args[2]
            wire = payload - _a2a_self_bytes(inputs[0], splits, group)
        elif "allreduce" in name or "all_reduce" in name:
            kind, volume, wire = "all_reduce", 2 * payload, 2 * payload * (n - 1) / n
        elif "allgather" in name or "all_gather" in name:
            # The inputs are this rank's shards: the gathered (full) tensor is n times larger.
            kind, volume = "all_gather", payload * n
            wire = volume * (n - 1) / n
        elif "reduce_scatter" in name:
            kind, volume, wire = "reduce_scatter", payload, payload * (n - 1) / n
        elif "broadcast" in name:
            kind, volume, wire = "broadcast", payload, payload * (n - 1) / n
        else:
            kind, volume, wire = name, payload, float(payload)
        for rec in (self.records[kind], self.by_group[(kind, group.group_name)]):
            rec.calls += 1
            rec.payload += payload
            rec.volume += volume
            rec.wire += wire

    def total(self, key: str = "volume") -> float:
        return sum(getattr(r, key) for r in self.records.values())


def _a2a_self_bytes(inp: torch.Tensor, splits, group: dist.ProcessGroup) -> int:
    """Bytes of the all-to-all input that stay on this rank (they cross no wire)."""
    rank, n = group.rank(), group.size()
    row = (inp.numel() // inp.shape[0]) * inp.element_size() if inp.shape[0] else 0
    rows = list(splits) if splits else [inp.shape[0] // n] * n
    return rows[rank] * row
