"""AdamW with decoupled weight decay on matrices only, and Gopher's schedule: linear warmup, cosine to 10%."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparselm.config import OptimConfig


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


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
