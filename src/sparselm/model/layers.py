"""Small building blocks shared by the transformer and the MoE layer: linear layers, norms, the dense FFN, rotary
embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.ops import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose product goes through :func:`sparselm.ops.linear`: a
    kernel that reads the weight once when decoding a row or two without autograd, ``F.linear`` everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Gopher): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision over d_model elements.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class FeedForward(nn.Module):
    """Dense FFN: SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu(up(x)))``)."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.up = Linear(d_model, d_ff, bias=bias)
        self.gate = Linear(d_model, d_ff, bias=bias) if kind == "swiglu" else None
        self.down = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings at integer ``positions`` [B, T] -> two [B, 1, T, head_dim/2] tensors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, T, hd/2]
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) of a [B, H, T, hd] tensor (the "rotate half" convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def sinusoid_table(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed sinusoidal embeddings of 0..length-1 (Transformer-XL relative distances) -> [length, dim]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)
