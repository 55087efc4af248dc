"""Where training runs: one process, or one rank of a torchrun job. The trainer talks to a ``Runtime`` only.

``Runtime`` is the world-size-1 case: the model as built, plain AdamW, torch's own gradient clipping, identity
reductions and a barrier that returns at once; its only policies are activation checkpointing and compile.
``ParallelRuntime`` is the same interface for a job laid out on a DeviceMesh: tensor parallel, then expert
parallel, then the policies, then data parallel / ZeRO (torchtitan's order, so FSDP wraps blocks that are already
DTensor-sharded and compiled); gradients are reduced and clipped over every rank, metrics averaged over the
data-parallel ranks, and each step's randomness is seeded from (seed, step, data-parallel rank).

``create_runtime(cfg)`` picks one: a process started alone gets ``Runtime``, a torchrun worker ``ParallelRuntime``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from sparselm.config import Config
from sparselm.optim import build_optimizer, build_scheduler
from sparselm.parallel.data_parallel import DTYPES, apply_data_parallel, set_gradient_sync
from sparselm.parallel.expert_parallel import apply_expert_parallel
from sparselm.parallel.launch import DistEnv, init_distributed, shutdown
from sparselm.parallel.layout import Layout, resolve_layout, validate_parallel
from sparselm.parallel.mesh import ParallelDims, default_device
from sparselm.parallel.tensor_parallel import apply_tensor_parallel
from sparselm.parallel.zero1 import ZeroStage1
from sparselm.precision import resolve_precision

Optimizer = torch.optim.Optimizer | ZeroStage1
Scheduler = torch.optim.lr_scheduler.LRScheduler


class Runtime:
    """One process. Every method is what the parallel runtime does, reduced to a world of one."""

    distributed = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    # ---- who and where ------------------------------------------------------------------------------------------
    is_main = True
    world_size = 1
    dp_rank = 0
    dp_size = 1

    def describe(self) -> str:
        p = self.cfg.parallel
        if p.tp > 1 or p.ep > 1 or p.dp_shard > 1 or p.dp_replicate > 1:
            return f"one process on {self.device} (the [parallel] layout is ignored: launch with torchrun to use it)"
        return f"one process on {self.device}"

    def resolve_precision(self, requested: str, warn: Callable[[str], None] | None = None) -> str:
        """``requested`` (auto | bf16 | fp32) -> what this job computes in: auto is bf16 only if every rank's device
        runs bf16 fast (sparselm.precision), so that all ranks agree."""
        precision = resolve_precision(requested, self.device, warn=warn)
        if requested == "auto":
            precision = "bf16" if self.all_agree(precision == "bf16") else "fp32"
        return precision

    def all_agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return flag

    def barrier(self) -> None:
        pass

    def close(self, clean: bool = True) -> None:
        pass

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply the layout to ``model`` in place; here only the policies."""
        self._apply_policies(model)
        return model

    def _apply_policies(self, model: nn.Module) -> None:
        for block in model.layers:
            block.checkpoint = self.cfg.train.activation_checkpointing
            if self.cfg.train.compile:
                block.compile()  # in place: parameter names (and so checkpoints) are unchanged

    def build_optimizer(self, model: nn.Module, start_step: int = 0) -> tuple[Optimizer, Scheduler]:
        """AdamW over the model (sparselm.optim) and its warmup + cosine schedule, positioned at ``start_step``."""
        optimizer = build_optimizer(model, self.cfg.optim)
        return optimizer, build_scheduler(optimizer, self.cfg.optim, self.cfg.train.max_steps, start_step)

    # ---- per step --------------------------------------------------------------------------------------------------
    def seed_step(self, step: int) -> None:
        """One process keeps a single RNG stream across steps (its state is saved with each checkpoint)."""

    def before_micro_batch(self, model: nn.Module, index: int, count: int) -> None:
        pass

    def reduce_and_clip_gradients(self, model: nn.Module, max_norm: float) -> float:
        """Global L2 norm of the gradients, scaled down to ``max_norm`` if above (``inf``: measure only)."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    def mean_over_dp(self, values: list[float]) -> list[float]:
        return list(values)

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def sharded_optimizer_state(self, model: nn.Module, optimizer: Optimizer) -> dict:
        """Optimizer state keyed by parameter name with global shapes: what a DCP checkpoint stores."""
        return get_optimizer_state_dict(model, optimizer)

    def load_sharded_optimizer_state(self, model: nn.Module, optimizer: Optimizer, state: dict, full: bool) -> None:
        """Inverse of ``sharded_optimizer_state``; ``full``: every tensor is whole (a single-process checkpoint)."""
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=full))


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


class ParallelRuntime(Runtime):
    """One rank of a torchrun job laid out as ``[parallel]`` says."""

    distributed = True

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        super().__init__(cfg, env.device)
        self.env = env
        self.layout: Layout = resolve_layout(cfg, env.world_size)
        self.dims = ParallelDims(self.layout, env.device.type)
        self.dp_group = self.dims.dp_mesh.get_group()
        self.zero1: ZeroStage1 | None = None

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    def describe(self) -> str:
        return f"{self.layout.describe()} ({self.env.backend})"

    def all_agree(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.item() == 1.0

    def barrier(self) -> None:
        dist.barrier()

    def close(self, clean: bool = True) -> None:
        shutdown(self.env, clean)

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply TP, EP, activation checkpointing / compile, then data parallel, in place."""
        cfg, layout = self.cfg, self.layout
        if layout.tp > 1:
            apply_tensor_parallel(model, self.dims.tp_mesh, cfg.parallel.sequence_parallel)
        if cfg.moe.enabled and layout.ep > 1:
            apply_expert_parallel(model, self.dims.ep_mesh, None)
        elif cfg.moe.enabled and layout.tp > 1:
            apply_expert_parallel(model, None, self.dims.tp_mesh)
        self._apply_policies(model)
        apply_data_parallel(model, cfg, self.dims)
        return model

    def build_optimizer(self, model: nn.Module, start_step: int = 0) -> tuple[Optimizer, Scheduler]:
        """AdamW as one process builds it, or under ZeRO-1 over this rank's slices of every parameter."""
        if self.layout.zero_stage != 1:
            return super().build_optimizer(model, start_step)
        expert_group = self.dims.expert_dp_mesh.get_group()
        group_of = {}
        for name, _ in model.named_parameters():
            is_expert = ".experts." in f".{name}" and self.layout.ep > 1
            group_of[name] = (expert_group if is_expert else self.dp_group, float(self.dp_size))
        self.zero1 = ZeroStage1(
            model.named_parameters(),
            group_of,
            lambda slots: build_optimizer(nn.ParameterList([shard for _, shard, _ in slots]), self.cfg.optim),
            reduce_dtype=DTYPES[self.cfg.parallel.reduce_dtype],
        )
        scheduler = build_scheduler(self.zero1.optimizer, self.cfg.optim, self.cfg.train.max_steps, start_step)
        return self.zero1, scheduler

    # ---- per step --------------------------------------------------------------------------------------------------
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

    def reduce_and_clip_gradients(self, model: nn.Module, max_norm: float) -> float:
        """Reduce ZeRO-1's gradients into their slices, then the global L2 norm over every rank, scaled down to
        ``max_norm`` if above.

        Each rank sums the squares of its local pieces, divided by how many ranks hold each piece; one scalar
        all-reduce over the world gives the exact total for any mix of replicated, sharded, TP and EP tensors."""
        if self.zero1 is not None:
            self.zero1.reduce_gradients()
            slots = [s for s in self.zero1.slots if s.shard.grad is not None]
            grads = [(s.shard.grad, _num_shards(s.param) * s.group.size()) for s in slots]
        else:
            grads = [(p.grad, _num_shards(p.grad)) for p in model.parameters() if p.grad is not None]
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for g, shards in grads:
            local += _local(g).detach().double().pow(2).sum() * shards / self.world_size
        dist.all_reduce(local)
        total = math.sqrt(local.item())  # nan / inf propagate: the trainer skips such a step on every rank
        if max_norm > 0 and math.isfinite(total) and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for g, _ in grads:
                _local(g).detach().mul_(coef)
        return total

    def mean_over_dp(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return (t / self.dp_size).tolist()

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, torch.float64).clone()
        dist.all_reduce(t, group=self.dp_group)
        return t.cpu()

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def sharded_optimizer_state(self, model: nn.Module, optimizer: Optimizer) -> dict:
        if self.zero1 is not None:
            return self.zero1.state_dict()
        return super().sharded_optimizer_state(model, optimizer)

    def load_sharded_optimizer_state(self, model: nn.Module, optimizer: Optimizer, state: dict, full: bool) -> None:
        if self.zero1 is not None:
            self.zero1.load_state_dict(state)
        else:
            super().load_sharded_optimizer_state(model, optimizer, state, full)


def create_runtime(cfg: Config) -> Runtime:
    """The runtime of this process: a torchrun worker joins the job's process group (left again by ``close``);
    a process started alone runs on its own. The ``[parallel]`` section is checked either way."""
    validate_parallel(cfg)
    env = init_distributed()
    if env is None:
        return Runtime(cfg, default_device())
    try:
        return ParallelRuntime(cfg, env)
    except BaseException:
        shutdown(env, clean=False)
        raise
