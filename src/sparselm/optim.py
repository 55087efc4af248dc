"""AdamW with decoupled weight decay on matrices only, and Gopher's schedule: linear warmup, cosine to 10%."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sparselm.config import OptimConfig
from sparselm.errors import ConfigError

# Where torch's fused AdamW kernel runs. "meta" holds no data: shape-only models (checkpoint parameter order, dry
# runs) build the optimizer there and never step it.
FUSED_DEVICES = ("cpu", "cuda", "meta")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay applies to tensors with two or more dims (matrices, embeddings, 3-D expert weights);
    norms, biases and the XL position biases are not decayed. With ``expert_lr_scale != 1`` the routed experts'
    weights (the only 3-D parameters, also as ZeRO-1 row shards or DTensor locals) get their own learning rate."""
    decay, no_decay, experts = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if p.ndim == 3 and cfg.expert_lr_scale != 1.0:
                experts.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if experts:
        groups.append({"params": experts, "weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.expert_lr_scale})
    fused = use_fused([p for g in groups for p in g["params"]], cfg.implementation)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=not fused
    )
    # Optimizer.load_state_dict replaces each group's settings by the saved ones, "fused" and "foreach" included:
    # without this a run resumed from a checkpoint of another implementation would silently run that one.
    optimizer.register_load_state_dict_post_hook(lambda opt: _set_implementation(opt, fused))
    return optimizer


def use_fused(params: list[torch.Tensor], implementation: str) -> bool:
    """Whether AdamW runs torch's fused kernel: one pass over each tensor instead of foreach's dozen (the whole update
    of a 42M-parameter model took 40 ms against 237 ms on 2 CPU cores, docs/benchmarks.md). It needs floating-point
    tensors on a device it has a kernel for. DTensors (FSDP2 and tensor parallelism) run it on their local shards:
    ``_fused_adamw_`` is a pointwise op in DTensor's sharding rules, and tests/test_parallel_train.py trains every
    layout with it (gloo) to the single-process losses."""
    if implementation == "foreach":
        return False
    unsupported = [p for p in params if not (torch.is_floating_point(p) and _device_type(p) in FUSED_DEVICES)]
    if unsupported and implementation == "fused":
        p = unsupported[0]
        raise ConfigError(
            f"optim.implementation = 'fused' needs floating-point parameters on {'/'.join(FUSED_DEVICES[:2])}, "
            f"got {p.dtype} on {p.device.type}; use 'auto' or 'foreach'"
        )
    return not unsupported


def implementation_of(optimizer: object) -> str:
    """The kernel ``optimizer`` (an AdamW from ``build_optimizer``, or ZeRO-1 around one) runs: fused or foreach."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return "fused" if inner.param_groups[0].get("fused") else "foreach"


def _device_type(p: torch.Tensor) -> str:
    return (p.to_local() if isinstance(p, DTensor) else p).device.type


def _set_implementation(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = fused, not fused
    if fused:  # the fused kernel keeps its step counts as float32 tensors on the parameters' device
        for p, state in optimizer.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Fraction of the peak learning rate at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or max_steps
    if step >= decay_steps:
        return cfg.min_lr_ratio
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / span
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as ``lr_multiplier`` gives it, its first ``step()`` due at optimizer step ``start_step``."""
    if start_step > 0:  # a scheduler that starts mid-way needs the peak rates it scales (torch's own convention)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, max_steps), last_epoch=start_step - 1
    )
