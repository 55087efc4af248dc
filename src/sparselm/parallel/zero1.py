"""ZeRO stage 1: every data-parallel rank keeps the full parameters and gradients but only 1/N of the optimizer state.

After backward, the gradients are reduce-scattered (each rank receives the data-parallel mean of its slice),
AdamW steps on that slice, and the updated slices are all-gathered back into the parameters: reduce-scatter plus
all-gather move as many bytes as the all-reduce of plain data parallelism (the 2 Psi of the ZeRO paper), which is
why this is written out here rather than taken from ``ZeroRedundancyOptimizer`` (all-reduce plus a broadcast of
every parameter, 3 Psi). Rank ``r`` owns rows ``[r * c, (r + 1) * c)`` of dim 0 of every parameter's local tensor,
``c = ceil(rows / N)`` (``torch.chunk``'s split, the same as DTensor's ``Shard(0)``); its AdamW updates views of
those rows in place, so the slices cost no extra memory.

Parameters may be DTensors of tensor or expert parallelism: the slicing applies to their local tensors, and each
parameter reduces over its own data-parallel group (experts: the ranks holding copies of the same experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Gradients are packed into flat buffers of at most this many elements per collective (bounds the extra memory).
BUCKET_ELEMENTS = 32 * 1024 * 1024


@dataclass
class _Slot:
    fqn: str
    param: nn.Parameter  # the model's parameter (plain or DTensor)
    local: torch.Tensor  # its local tensor (aliases the parameter's storage)
    shard: nn.Parameter  # rows [start, end) of ``local``: what this rank's optimizer updates
    group: dist.ProcessGroup
    divide: float  # the gradient is the sum over the group divided by this (the data-parallel size)
    rows: int
    chunk: int  # rows per rank before clipping to ``rows`` (padding)
    start: int
    end: int

    @property
    def row_numel(self) -> int:
        return math.prod(self.local.shape[1:])

    @property
    def packed_numel(self) -> int:
        return self.chunk * self.row_numel


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ZeroStage1:
    """Owns the optimizer over this rank's slices; ``reduce_gradients`` after backward, then ``step``.

    ``group_of[name]`` is the (data-parallel group, gradient divisor) of each parameter; ``build_optimizer`` is
    called with the slots ``(name, slice, parameter)`` and returns the torch optimizer over the slices."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        group_of: dict[str, tuple[dist.ProcessGroup, float]],
        build_optimizer: Callable[[list[tuple[str, nn.Parameter, nn.Parameter]]], torch.optim.Optimizer],
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        self.slots: list[_Slot] = []
        self.reduce_dtype = reduce_dtype
        for fqn, param in named_params:
            if not param.requires_grad:
                continue
            group, divide = group_of[fqn]
            with torch.no_grad():
                local = _local(param)
            world, rank = group.size(), group.rank()
            rows = local.shape[0] if local.ndim else 1
            chunk = math.ceil(rows / world)
            start, end = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
            view = local.detach().view(rows, -1)[start:end].view(end - start, *local.shape[1:])
            shard = nn.Parameter(view)  # aliases ``local``: updates land in the model's parameter directly
            self.slots.append(_Slot(fqn, param, local, shard, group, divide, rows, chunk, start, end))
        self._by_shard = {id(s.shard): s for s in self.slots}
        # The optimizer sees the slices. A slice keeps its parameter's number of dims, so the weight-decay rule of
        # sparselm.optim (matrices decayed, vectors not) applies to slices unchanged.
        self.optimizer: torch.optim.Optimizer = build_optimizer([(s.fqn, s.shard, s.param) for s in self.slots])

    # ---- the training step -------------------------------------------------------------------------------------
    def _buckets(self) -> list[list[_Slot]]:
        buckets: dict[tuple, list[list[_Slot]]] = {}
        for s in self.slots:
            key = (id(s.group), s.local.dtype)
            lists = buckets.setdefault(key, [[]])
            if lists[-1] and sum(x.packed_numel for x in lists[-1]) + s.packed_numel > BUCKET_ELEMENTS:
                lists.append([])
            lists[-1].append(s)
        return [b for lists in buckets.values() for b in lists]

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter the full gradients into each rank's slice (then free the full gradients)."""
        for bucket in self._buckets():
            group = bucket[0].group
            world = group.size()
            dtype = self.reduce_dtype or bucket[0].local.dtype
            total = sum(s.packed_numel for s in bucket)
            send = torch.zeros(world, total, dtype=dtype, device=bucket[0].local.device)
            offset = 0
            for s in bucket:
                grad = s.param.grad
                if grad is not None:
                    g = _local(grad).reshape(s.rows, -1)
                    padded = torch.zeros(world * s.chunk, s.row_numel, dtype=dtype, device=g.device)
                    padded[: s.rows] = g
                    send[:, offset : offset + s.packed_numel] = padded.view(world, -1)
                offset += s.packed_numel
            recv = torch.empty(total, dtype=dtype, device=send.device)
            dist.reduce_scatter_single(recv, send.view(-1), op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for s in bucket:
                numel = (s.end - s.start) * s.row_numel
                g = recv[offset : offset + numel].view(s.shard.shape).to(s.local.dtype) / s.divide
                s.shard.grad = g
                s.param.grad = None
                offset += s.packed_numel

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """All-gather every rank's updated slices back into the full parameters."""
        for bucket in self._buckets():
            group = bucket[0].group
            world = group.size()
            total = sum(s.packed_numel for s in bucket)
            send = torch.zeros(total, dtype=bucket[0].local.dtype, device=bucket[0].local.device)
            offset = 0
            for s in bucket:
                send[offset : offset + s.shard.numel()] = s.shard.reshape(-1)
                offset += s.packed_numel
            recv = torch.empty(world * total, dtype=send.dtype, device=send.device)
            dist.all_gather_single(recv, send, group=group)
            recv = recv.view(world, total)
            offset = 0
            for s in bucket:
                full = recv[:, offset : offset + s.packed_numel].reshape(world * s.chunk, -1)[: s.rows]
                s.local.copy_(full.view(s.local.shape))
                offset += s.packed_numel

    def step(self) -> None:
        self.optimizer.step()
        self.gather_parameters()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for s in self.slots:
            s.param.grad = None

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _ensure_state(self) -> None:
        """Create the optimizer state (AdamW's moments) before the first step, as loading needs somewhere to go."""
        if all(s.shard in self.optimizer.state for s in self.slots):
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for s in self.slots:
            s.shard.grad = torch.zeros_like(s.shard)
        self.optimizer.step()  # lr 0: the moments are created, the weights do not move
        for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def _wrap_like(self, s: _Slot, full_local: torch.Tensor) -> torch.Tensor:
        if isinstance(s.param, DTensor):
            return DTensor.from_local(
                full_local, s.param.device_mesh, s.param.placements, shape=s.param.shape, stride=s.param.stride()
            )
        return full_local

    @torch.no_grad()
    def state_dict(self) -> dict:
        """FQN-keyed state with full (global) shapes, the format of ``get_optimizer_state_dict``: each moment is
        all-gathered over the data-parallel group, so other layouts (and one process) can load it."""
        self._ensure_state()
        state: dict[str, dict] = {}
        for s in self.slots:
            entry = {}
            for key, value in self.optimizer.state[s.shard].items():
                if torch.is_tensor(value) and value.shape == s.shard.shape and value.ndim > 0:
                    entry[key] = self._wrap_like(s, self._gather(s, value))
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value
            state[s.fqn] = entry
        groups = []
        for g in self.optimizer.param_groups:
            names = [self._by_shard[id(p)].fqn for p in g["params"]]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": names})
        return {"state": state, "param_groups": groups}

    def _gather(self, s: _Slot, value: torch.Tensor) -> torch.Tensor:
        world = s.group.size()
        padded = torch.zeros(s.chunk, s.row_numel, dtype=value.dtype, device=value.device)
        padded[: s.end - s.start] = value.reshape(s.end - s.start, -1)
        out = torch.empty(world * s.chunk, s.row_numel, dtype=value.dtype, device=value.device)
        dist.all_gather_single(out, padded, group=s.group)
        return out[: s.rows].view(s.local.shape)

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Inverse of :meth:`state_dict` (full-shape moments in, this rank's rows kept)."""
        self._ensure_state()
        for s in self.slots:
            saved = sd["state"][s.fqn]
            for key, value in self.optimizer.state[s.shard].items():
                src = saved[key]
                if torch.is_tensor(value) and value.shape == s.shard.shape and value.ndim > 0:
                    if isinstance(s.param, DTensor) and not isinstance(src, DTensor):
                        # A full tensor from a single-process checkpoint: keep this rank's TP/EP piece first.
                        src = distribute_tensor(src, s.param.device_mesh, s.param.placements, src_data_rank=None)
                    full = _local(src).reshape(s.rows, -1)
                    value.copy_(full[s.start : s.end].view(value.shape))
                elif torch.is_tensor(value):
                    value.copy_(_local(src))
        by_name = {tuple(g["params"]): g for g in sd["param_groups"]}
        for g in self.optimizer.param_groups:
            names = tuple(self._by_shard[id(p)].fqn for p in g["params"])
            saved = by_name.get(names)
            if saved is not None:
                g.update({k: v for k, v in saved.items() if k != "params"})
