"""Top-k softmax router, computed in fp32, with the Switch load-balancing loss and the ST-MoE router z-loss.

Routers are numerically touchy: a bf16 softmax over many experts saturates and the router collapses onto a few
experts. So the router always runs in fp32, whatever autocast says around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    weights: torch.Tensor  # [T, k] fp32 gate weight of each chosen expert
    experts: torch.Tensor  # [T, k] int64 chosen expert ids, best first
    probs: torch.Tensor  # [T, E] fp32 full softmax
    # Both scalars are 0 under torch.inference_mode, which skips them: only training uses them.
    aux_loss: torch.Tensor  # scalar, Switch load-balancing loss (without its coefficient)
    z_loss: torch.Tensor  # scalar, mean squared log-partition (without its coefficient)
    tokens_per_expert: torch.Tensor  # [E] int64 assignments per expert, before any capacity dropping


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*k assignments that went to expert e and ``P_e`` the mean router probability
    of e. Both are 1/E under perfectly uniform routing, where the loss equals 1 (its minimum for a given P).
    """
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    fraction_routed = counts / experts.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2``; keeps router logits small and stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Router(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        jitter: float = 0.0,
        init_std: float = 0.02,
        top1_gate: str = "probability",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.jitter = jitter
        self.init_std = init_std
        self.top1_gate = top1_gate
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens ``x`` of shape [T, d_model]."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
                x = x * noise
            logits = F.linear(x, self.weight.float())
            probs = torch.softmax(logits, dim=-1)
            weights, experts = torch.topk(probs, self.top_k, dim=-1)
            if self.renormalize and self.top_k > 1:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            elif self.top_k == 1 and self.top1_gate == "straight_through":
                # Value 1 (the expert is not scaled by a probability near 1/E at init), gradient the probability's.
                weights = weights + (1.0 - weights).detach()
            if torch.is_inference_mode_enabled():  # generation, serving, scoring: nothing trains on them
                aux = z = torch.zeros((), device=x.device)
            else:
                aux = load_balancing_loss(probs, experts, self.num_experts)
                z = router_z_loss(logits)
        tokens_per_expert = torch.bincount(experts.flatten(), minlength=self.num_experts)
        return RouterOutput(weights, experts, probs, aux, z, tokens_per_expert)
