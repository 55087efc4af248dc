"""Expert parallelism (GShard / GLaM / DeepSpeed-MoE) and expert tensor parallelism, applied from outside the model.

``MoE`` calls ``self.experts(x_sorted_by_expert, counts, gates)``; :class:`ParallelExperts` replaces that submodule
with one holding a slice of the 3-D expert weights, stored as DTensors so that checkpoints see the global shapes:

- ``ep > 1``: rank ``r`` of the ep group owns experts ``[r * E/ep, (r + 1) * E/ep)`` (``Shard(0)``). Rows, already
  sorted by global expert, go to the rank owning their expert with one ``all_to_all_single`` (uneven split sizes,
  after exchanging the per-expert counts), are regrouped by local expert, computed in grouped matmuls, put back in
  arrival order and returned with a second all-to-all. Both all-to-alls are differentiable (the backward is the
  same exchange in reverse).
- ``tp > 1``: every rank keeps all experts but a slice of their hidden width (``w_up``/``w_gate`` column-parallel,
  ``w_down`` row-parallel, as Megatron splits a dense FFN); one all-reduce sums the partial outputs.

The gates scale the rows once they are back on their own rank (after the all-to-all or the all-reduce), so they
never travel. Routing, capacity and the auxiliary losses stay in ``MoE``/``Router`` on each rank's own tokens, so
the aux losses mean the same thing in every layout (they are per micro-batch of ``train.micro_batch_size``
sequences).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.func import functional_call

from sparselm.model.moe import MoE, compute_dtype


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _CopyToTP(torch.autograd.Function):
    """Megatron's ``f``: identity forward; backward sums the input gradients of the tp ranks' partial FFNs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's ``g``: forward sums the partial outputs; the gradient is already the same on every tp rank."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        y = y.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# Which dim of each expert tensor tensor parallelism splits (the hidden width f), and expert parallelism splits 0.
_TP_DIM = {"w_up": 2, "w_gate": 2, "w_down": 1, "b_up": 1, "b_down": None}


class ParallelExperts(nn.Module):
    """Drop-in replacement for ``Experts`` (same call, same parameter names) holding this rank's slice."""

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh | None = None, tp_mesh: DeviceMesh | None = None):
        super().__init__()
        if (ep_mesh is None) == (tp_mesh is None):
            raise ValueError("ParallelExperts needs exactly one of ep_mesh and tp_mesh")
        self.mesh = ep_mesh if ep_mesh is not None else tp_mesh
        self.mode = "ep" if ep_mesh is not None else "tp"
        self.size = self.mesh.size()
        self.group = self.mesh.get_group()
        self.num_experts = experts.w_up.shape[0]
        if self.mode == "ep" and self.num_experts % self.size:
            raise ValueError(f"{self.num_experts} experts cannot be split over {self.size} expert-parallel ranks")
        for name, param in experts.named_parameters(recurse=False):
            if self.mode == "ep":
                placement = Shard(0)
            else:
                placement = Replicate() if _TP_DIM[name] is None else Shard(_TP_DIM[name])
            # src_data_rank=None: every rank holds the same seeded full tensor, so each just keeps its slice.
            local = distribute_tensor(param.detach(), self.mesh, [placement], src_data_rank=None)
            self.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))
        for name in ("w_gate", "b_up", "b_down"):
            if not hasattr(self, name):
                self.register_parameter(name, None)
        # The computation itself is the model's own Experts.forward, run on the local slices through
        # functional_call, so expert parallelism never diverges from the single-device kernel. The template lives
        # on the meta device and outside the module tree (it must not appear in state dicts).
        local_shapes = {n: tuple(_local(p).shape) for n, p in self.named_parameters(recurse=False)}
        with torch.device("meta"):
            template = type(experts)(
                local_shapes["w_up"][0],
                local_shapes["w_up"][1],
                local_shapes["w_up"][2],
                getattr(experts, "kind", "swiglu"),
                experts.b_up is not None,
            )
        for key, value in vars(experts).items():
            if not key.startswith("_") and key != "training":
                setattr(template, key, value)  # e.g. the kernel choice of the original module
        self.__dict__["_template"] = template

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.size if self.mode == "ep" else self.num_experts

    def _compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on rows ``x`` sorted by local expert (tp: a partial sum over this rank's width)."""
        weights = {n: _local(p) for n, p in self.named_parameters(recurse=False)}
        b_down = weights.get("b_down")
        if self.mode == "tp":
            if b_down is not None:
                # Added once after the reduction below, not once per tp rank.
                weights["b_down"] = torch.zeros_like(b_down)
            x = _CopyToTP.apply(x, self.group)
        y = functional_call(self.__dict__["_template"], weights, (x, counts, None))
        if self.mode == "tp":
            y = _ReduceFromTP.apply(y, self.group)
            if b_down is not None:
                rows_expert = torch.repeat_interleave(torch.arange(len(counts), device=y.device), counts)
                y = y + b_down.to(y.dtype)[rows_expert]
        return y

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """``x`` [M, d_model] sorted by global expert, ``counts`` [E] rows per expert, ``gates`` [M] scaling each
        row's output (None: unscaled) -> [M, d_model]."""
        y = self._compute(x, counts) if self.mode == "tp" else self._exchange_and_compute(x, counts)
        return y if gates is None else y * gates.unsqueeze(-1).to(y.dtype)

    def _exchange_and_compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """ep: rows to the ranks owning their experts, computed there, and back in the order they came."""
        x = x.to(compute_dtype(x))  # the experts compute in it anyway; under bf16 autocast it halves the bytes sent
        ep, local_e = self.size, self.num_local_experts
        send_counts = counts.view(ep, local_e)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)  # -> [source, local expert]
        send = send_counts.sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        rows = _AllToAll.apply(x, send, recv, self.group)  # grouped by source rank, then by local expert
        expert_of_row = torch.repeat_interleave(
            torch.arange(local_e, device=x.device).repeat(ep), recv_counts.flatten()
        )
        order = torch.argsort(expert_of_row, stable=True)  # group by local expert, sources in rank order
        y_sorted = self._compute(rows[order], recv_counts.sum(0))
        y_rows = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to arrival order
        return _AllToAll.apply(y_rows, recv, send, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh | None, tp_mesh: DeviceMesh | None) -> int:
    """Swap every ``MoE.experts`` for a :class:`ParallelExperts`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ParallelExperts):
            module.experts = ParallelExperts(module.experts, ep_mesh=ep_mesh, tp_mesh=tp_mesh)
            swapped += 1
    return swapped
