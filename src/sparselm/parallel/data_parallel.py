"""Data parallelism and the ZeRO stages on FSDP2, applied after tensor and expert parallelism.

- ZeRO-0: ``replicate`` (FSDP2's DDP: full copies, gradients all-reduced, 16 Psi bytes per rank with Adam);
- ZeRO-1: nothing on the model; :class:`sparselm.parallel.zero1.ZeroStage1` shards the optimizer state;
- ZeRO-2: ``fully_shard(reshard_after_forward=False)``: gathered parameters live from forward to the end of
  backward, gradients are reduce-scattered, parameters and optimizer state rest sharded between steps;
- ZeRO-3: ``fully_shard(reshard_after_forward=True)``: parameters are gathered again in backward (3 Psi traffic).

Wrapping is bottom-up: each MoE's experts first (on the expert data-parallel mesh when expert parallelism splits
them), each block next, the root last, so every block is one all-gather / reduce-scatter unit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from sparselm.config import Config
from sparselm.model.moe import MoE
from sparselm.parallel.mesh import ParallelDims

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mixed_precision_policy(cfg: Config) -> MixedPrecisionPolicy:
    """bf16 ``param_dtype`` gathers and computes in bf16 (the fp32 shards stay the optimizer's master weights);
    ``reduce_dtype`` fp32 keeps the gradient reduction exact whatever the compute dtype."""
    p = cfg.parallel
    param_dtype = None if p.param_dtype == "fp32" else DTYPES[p.param_dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[p.reduce_dtype])


def _wrap(module: nn.Module, cfg: Config, mesh, stage: int, experts: bool = False) -> FSDPModule:
    mp = mixed_precision_policy(cfg)
    if stage == 0:
        return replicate(module, mesh=mesh, mp_policy=mp)
    offload = OffloadPolicy()
    if cfg.parallel.cpu_offload:
        # Pinned host memory makes the GPU copies asynchronous; without a GPU there is nothing to pin (or offload).
        offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    return fully_shard(
        module,
        mesh=mesh,
        reshard_after_forward=stage == 3,
        mp_policy=mp,
        offload_policy=offload,
        shard_placement_fn=_placement(mesh.size(mesh.ndim - 1), experts),
    )


def _placement(shards: int, experts: bool):
    """Which dim FSDP shards: dim 0, unless it is shorter than the number of shards. FSDP pads dim 0 to a multiple
    of the shards, so expert weights ``[E, d_in, d_out]`` with fewer experts than shards (GLaM: 64 experts over
    1,024 ranks, or one local expert per rank at ep=64 sharded 16 ways) would give every shard a whole expert,
    16-1,024x the memory and traffic (``sparselm plan`` showed it): such tensors are sharded on dim 1 when it
    divides. ``experts``: the module is a ``ParallelExperts``, whose DTensors (over the ep mesh) are judged by their
    local shape."""

    def placement(param: torch.Tensor):
        local = param.to_local() if isinstance(param, DTensor) else param
        if (isinstance(param, DTensor) and not experts) or local.dim() < 2:
            return None  # tensor-parallel DTensors keep FSDP's default
        if local.shape[0] >= shards or local.shape[1] % shards:
            return None
        return Shard(1)

    return placement


def apply_data_parallel(model: nn.Module, cfg: Config, dims: ParallelDims) -> None:
    """Wrap ``model`` (a ``Transformer``, possibly already tensor/expert parallel) for ZeRO stage 0, 2 or 3."""
    layout = dims.layout
    stage = layout.zero_stage
    if stage == 1:
        return
    mesh = dims.dp_mesh if stage == 0 else dims.fsdp_mesh()
    expert_mesh = dims.expert_dp_mesh if stage == 0 else dims.expert_fsdp_mesh()
    for block in model.layers:
        if layout.ep > 1 and isinstance(block.ffn, MoE):
            experts = _wrap(block.ffn.experts, cfg, expert_mesh, stage, experts=True)
            # Each expert copy saw the tokens of all ep ranks, so the sum over its copies still has to be divided
            # by the whole data-parallel size, not by the number of copies.
            experts.set_gradient_divide_factor(float(layout.dp))
        _wrap(block, cfg, mesh, stage)
    _wrap(model, cfg, mesh, stage)
    if dims.device_type == "cpu":
        # gloo has no PREMUL_SUM (used for a custom divide factor): reduce with SUM and divide instead.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction on or off for the next backward (ZeRO-0 accumulates locally like DDP's no_sync)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
