"""A nanoGPT-style GPT and training step, the reference row of ``benchmarks/train.py``.

Written for this benchmark (not a copy) to do what nanoGPT's ``model.py`` + ``train.py`` do per step on a CPU:
GPT-2 blocks (pre-LayerNorm with bias, fused q/k/v projection, causal ``scaled_dot_product_attention``, 4x GELU
MLP), learned position embeddings, the output layer tied to the token embedding, ``F.cross_entropy`` over the full
logits; AdamW with betas (0.9, 0.95), weight decay on matrices only and the non-fused, non-foreach update nanoGPT
gets off CUDA; gradient clipping at 1.0; ``zero_grad(set_to_none=True)``; bf16 autocast when asked. No dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=2)
        q, k, v = (t.unflatten(2, (self.n_heads, -1)).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def training_step(
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    context: int,
    precision: str,
    compile: bool = False,
) -> tuple[GPT, Callable[[torch.Tensor, torch.Tensor], float]]:
    """The model and one optimizer step on a batch (x, y) -> loss, as nanoGPT's train.py runs it on a CPU."""
    torch.manual_seed(0)
    model = GPT(vocab_size, d_model, n_layers, n_heads, context)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4,
        betas=(0.9, 0.95),
        foreach=False,
    )
    forward = torch.compile(model) if compile else model
    bf16 = precision == "bf16"

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step
