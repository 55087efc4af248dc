"""One transformer block: attention, an optional cross sublayer (RETRO's chunked cross-attention), then a dense or MoE
feed-forward, each pre-normed on a residual stream."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparselm.config import ModelConfig, MoEConfig
from sparselm.model.attention import Attention
from sparselm.model.layers import FeedForward, make_norm
from sparselm.model.moe import MoE, MoEStats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, use_moe: bool) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.bias, cfg.position, cfg.dropout, cfg.qk_norm, cfg.norm_eps)
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if use_moe:
            self.ffn: nn.Module = MoE(cfg.d_model, moe.d_ff_expert or cfg.d_ff, moe, cfg.ffn, cfg.bias)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.ffn, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        # Optional sublayer between attention and FFN, ``cross(x, cross_inputs)`` -> residual update: RETRO's
        # chunked cross-attention (model/retro.py). None in a plain model, so its parameters and speed are unchanged.
        self.cross: nn.Module | None = None
        self.checkpoint = False  # set from outside (activation checkpointing is a training policy)

    def _forward(
        self, x: torch.Tensor, valid, attn_kwargs: dict, cross_inputs=None
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.dropout(self.attn(self.attn_norm(x), **attn_kwargs))
        if self.cross is not None and cross_inputs is not None:
            x = x + self.dropout(self.cross(x, cross_inputs))
        stats = None
        if isinstance(self.ffn, MoE):
            h, stats = self.ffn(self.ffn_norm(x), valid)
        else:
            h = self.ffn(self.ffn_norm(x))
        return x + self.dropout(h), stats

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, cross_inputs=None, **attn_kwargs
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """``valid`` [B, T] marks real tokens (None: all real); ``cross_inputs`` feed the cross sublayer (if any);
        the rest goes to attention."""
        if cross_inputs is not None and self.cross is not None:
            return self._forward(x, valid, attn_kwargs, cross_inputs)  # never checkpointed: it may run the encoder
        if self.checkpoint and self.training and attn_kwargs.get("cache") is None:
            return checkpoint(self._forward, x, valid, attn_kwargs, use_reentrant=False)
        return self._forward(x, valid, attn_kwargs)
