"""What the training loop needs from a multi-process layout: the parallel model and optimizer, the data-parallel
rank for the batch split, gradient reduction and clipping, metric reduction and per-rank randomness.

Order of application (as torchtitan): tensor parallel, then expert parallel, then activation checkpointing and
compile, then data parallel / ZeRO, so FSDP wraps blocks that are already DTensor-sharded and compiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from sparselm.config import Config
from sparselm.model.moe import MoE
from sparselm.parallel.data_parallel import DTYPES, apply_data_parallel, set_gradient_sync
from sparselm.parallel.expert_parallel import ParallelExperts, apply_expert_parallel
from sparselm.parallel.launch import DistEnv
from sparselm.parallel.layout import Layout, resolve_layout
from sparselm.parallel.mesh import ParallelDims
from sparselm.parallel.tensor_parallel import apply_tensor_parallel
from sparselm.parallel.zero1 import ZeroStage1


def _num_shards(t: torch.Tensor) -> int:
    """Into how many distinct pieces a (DTensor) gradient is split across the mesh (1 when replicated)."""
    if not isinstance(t, DTensor):
        return 1
    n = 1
    for i, placement in enumerate(t.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            n *= t.device_mesh.size(i)
    return n


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ParallelRuntime:
    """Built once per ``train`` call in a torchrun job; single-process training never creates one."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.layout: Layout = resolve_layout(cfg, env.world_size)
        self.dims = ParallelDims(self.layout, env.device.type)
        self.dp_group = self.dims.dp_mesh.get_group()
        self.zero1: ZeroStage1 | None = None

    # ---- set-up -----------------------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply TP, EP, activation checkpointing / compile, then data parallel, in place."""
        cfg, layout = self.cfg, self.layout
        if layout.tp > 1:
            apply_tensor_parallel(model, self.dims.tp_mesh, cfg.parallel.sequence_parallel)
        if cfg.moe.enabled and layout.ep > 1:
            apply_expert_parallel(model, self.dims.ep_mesh, None)
        elif cfg.moe.enabled and layout.tp > 1:
            apply_expert_parallel(model, None, self.dims.tp_mesh)
        for block in model.layers:
            block.checkpoint = cfg.train.activation_checkpointing
            if cfg.train.compile:
                block.compile()
        apply_data_parallel(model, cfg, self.dims)
        return model

    def build_optimizer(
        self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer | ZeroStage1:
        """``make_optimizer(module)`` builds the AdamW over ``module.parameters()`` (sparselm.train.optim)."""
        if self.layout.zero_stage != 1:
            return make_optimizer(model)
        expert_group = self.dims.expert_dp_mesh.get_group()
        group_of = {}
        for name, _ in model.named_parameters():
            is_expert = ".experts." in f".{name}" and self.layout.ep > 1
            group_of[name] = (expert_group if is_expert else self.dp_group, float(self.dp_size))
        reduce_dtype = DTYPES[self.cfg.parallel.reduce_dtype]
        self.zero1 = ZeroStage1(
            model.named_parameters(),
            group_of,
            lambda slots: make_optimizer(nn.ParameterList([shard for _, shard, _ in slots])),
            reduce_dtype=reduce_dtype,
        )
        return self.zero1

    # ---- per step ---------------------------------------------------------------------------------------------
    def seed_step(self, step: int) -> None:
        """Seed this step's randomness (router jitter, dropout) from (seed, step, dp rank): tensor-parallel peers
        share it, data-parallel ranks differ, and a resumed run in any layout draws the same numbers."""
        state = np.random.SeedSequence([self.cfg.train.seed, step, self.dp_rank]).generate_state(2, np.uint32)
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))

    def before_micro_batch(self, model: nn.Module, index: int, count: int) -> None:
        # ZeRO-0 accumulates gradients locally and all-reduces once, after the last micro-batch (DDP's no_sync).
        # ZeRO-2/3 reduce-scatter every micro-batch: keeping gradients sharded is the point of those stages.
        if self.layout.zero_stage == 0:
            set_gradient_sync(model, index == count - 1)

    def after_backward(self) -> None:
        if self.zero1 is not None:
            self.zero1.reduce_gradients()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Global L2 norm of the gradients over every rank, then scale them down to ``max_norm`` if above.

        Each rank sums the squares of its local pieces, divided by how many ranks hold each piece; one scalar
        all-reduce over the world gives the exact total for any mix of replicated, sharded, TP and EP tensors."""
        if self.zero1 is not None:
            slots = [s for s in self.zero1.slots if s.shard.grad is not None]
            grads = [(s.shard.grad, _num_shards(s.param) * s.group.size()) for s in slots]
        else:
            grads = [(p.grad, _num_shards(p.grad)) for p in model.parameters() if p.grad is not None]
        world = self.env.world_size
        local = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for g, shards in grads:
            local += _local(g).detach().double().pow(2).sum() * shards / world
        dist.all_reduce(local)
        total = math.sqrt(local.item())  # nan / inf propagate: the trainer skips such a step on every rank
        if max_norm > 0 and math.isfinite(total) and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for g, _ in grads:
                _local(g).detach().mul_(coef)
        return total

    def mean_over_dp(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t, group=self.dp_group)
        return (t / self.dp_size).tolist()

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.env.device, torch.float64).clone()
        dist.all_reduce(t, group=self.dp_group)
        return t.cpu()


def count_local_experts(model: nn.Module) -> list[int]:
    """Experts held by this rank in each MoE layer (for messages and tests)."""
    out = []
    for module in model.modules():
        if isinstance(module, MoE):
            experts = module.experts
            out.append(experts.num_local_experts if isinstance(experts, ParallelExperts) else module.num_experts)
    return out
