"""RETRO's two additions to a decoder (Borgeaud et al. 2021, arXiv 2112.04426): the neighbour encoder and chunked
cross-attention (CCA), built from the decoder's own ``Block``, ``Attention`` and ``MoE``.

The input of T tokens is cut into chunks of m tokens; chunk u (complete chunks only, u < T // m) comes with k
retrieved neighbours of r tokens each (a database chunk and its continuation, r = 2m), ``neighbours`` [B, C, k, r].

- Encoder: each neighbour of chunk u runs through a few bidirectional ``Block``s (rotary positions 0..r-1) whose
  cross sublayer attends to H_u, the decoder's activations over chunk u at the first CCA layer (after its
  self-attention). It runs once per forward, when that layer is reached, and its output E [B*C, k*r, d_enc] serves
  every CCA layer.
- CCA: the paper's causal shift. Position i attends to the neighbours of chunk u = (i + 1) // m - 1, the latest
  chunk complete at i: a chunk's last token and the next chunk's first m - 1 tokens attend to that chunk's
  neighbours, and the first m - 1 tokens of a sequence attend to none (their update is zero). No logit before
  position (u + 1) * m - 1 can depend on chunk u's neighbours (tests/test_retro_model.py checks it).

With ``neighbours=None`` the cross sublayers are skipped, so a RETRO model without retrieval computes exactly what the
decoder alone computes: RETRO-fitting relies on it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.config import ModelConfig, MoEConfig, RetroConfig
from sparselm.errors import InputError
from sparselm.model.attention import Attention
from sparselm.model.block import Block
from sparselm.model.layers import make_norm, rope_cos_sin


class CrossAttention(Attention):
    """Attention whose keys and values come from ``memory`` (width ``d_memory``) instead of ``x``: the projections
    and head layout of ``Attention``, no positions and no mask (every query may see all of its memory)."""

    def __init__(self, d_model: int, n_heads: int, d_memory: int, bias: bool, dropout: float) -> None:
        super().__init__(d_model, n_heads, bias, position="none", dropout=dropout)
        if d_memory != d_model:
            self.k_proj = nn.Linear(d_memory, d_model, bias=bias)
            self.v_proj = nn.Linear(d_memory, d_model, bias=bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``x`` [N, Tq, d_model] attends to ``memory`` [N, Tk, d_memory] -> [N, Tq, d_model]."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).flatten(-2))


class ChunkedCrossAttention(nn.Module):
    """The decoder's cross sublayer: pre-norm, then each shifted chunk attends to its chunk's encoded neighbours."""

    def __init__(self, cfg: ModelConfig, d_memory: int, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = CrossAttention(cfg.d_model, cfg.n_heads, d_memory, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, retrieval: Retrieval) -> torch.Tensor:
        memory = retrieval.memory(x)  # [B * C, k * r, d_enc]; the first CCA layer runs the encoder here
        m, (B, T, _) = self.chunk_size, x.shape
        C = T // m
        h = self.norm(x)
        served = T - (m - 1)  # positions m-1 .. T-1 see some chunk's neighbours
        if C == 0:
            return torch.zeros_like(h)
        # Shift by m - 1 and pad to C whole chunks: query chunk u is positions (u+1)m-1 .. (u+2)m-2.
        shifted = F.pad(h[:, m - 1 :], (0, 0, 0, C * m - served))
        y = self.attn(shifted.unflatten(1, (C, m)).flatten(0, 1), memory)  # [B * C, m, d]
        y = y.unflatten(0, (B, C)).flatten(1, 2)[:, :served]
        return torch.cat([torch.zeros_like(h[:, : m - 1]), y], dim=1)


class NeighbourConditioning(nn.Module):
    """The encoder's cross sublayer: each neighbour token attends to H_u, the decoder activations of its chunk."""

    def __init__(self, cfg: ModelConfig, d_memory: int, memory_norm: nn.Module) -> None:
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.memory_norm = memory_norm
        self.attn = CrossAttention(cfg.d_model, cfg.n_heads, d_memory, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, chunk_states: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(x), self.memory_norm(chunk_states))


class NeighbourEncoder(nn.Module):
    """Bidirectional ``Block``s over each neighbour (token embeddings shared with the decoder), conditioned on the
    decoder's activations over the neighbour's chunk."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, retro: RetroConfig) -> None:
        super().__init__()
        d_enc = retro.encoder_d_model or cfg.d_model
        self.cfg = dataclasses.replace(
            cfg,
            d_model=d_enc,
            n_heads=retro.encoder_heads or cfg.n_heads,
            d_ff=retro.encoder_d_ff or cfg.d_ff,
            n_layers=retro.encoder_layers,
            position="rope",
        )
        self.chunk_size = retro.chunk_size
        self.neighbours = retro.neighbours  # k it was trained with: the default at use time
        self.proj_in = nn.Linear(cfg.d_model, d_enc, bias=False) if d_enc != cfg.d_model else None
        moe_layers = set(retro.encoder_moe_layers(moe))
        self.layers = nn.ModuleList(Block(self.cfg, moe, i in moe_layers) for i in range(retro.encoder_layers))
        for block in self.layers:
            memory_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
            block.cross = NeighbourConditioning(self.cfg, cfg.d_model, memory_norm)
        self.norm = make_norm(self.cfg.norm, d_enc, self.cfg.norm_eps, self.cfg.bias)

    def forward(self, neighbours: torch.Tensor, h: torch.Tensor, embed: nn.Embedding) -> tuple[torch.Tensor, list]:
        """``neighbours`` [B, C, k, r] ids, ``h`` [B, T, d] decoder activations -> (E [B * C, k * r, d_enc], MoE
        stats of the encoder's MoE layers)."""
        B, C, k, r = neighbours.shape
        m = self.chunk_size
        x = embed(neighbours.flatten(0, 2))  # [B * C * k, r, d]
        if self.proj_in is not None:
            x = self.proj_in(x)
        chunk_states = h[:, : C * m].unflatten(1, (C, m)).unsqueeze(2).expand(-1, -1, k, -1, -1).flatten(0, 2)
        positions = torch.arange(r, device=neighbours.device).unsqueeze(0)
        rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta)
        everything = torch.zeros(1, 1, r, r, device=neighbours.device)  # bidirectional: no mask at all
        stats = []
        for block in self.layers:
            x, layer_stats = block(x, None, chunk_states, rope=rope, attn_bias=everything)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.norm(x).unflatten(0, (B * C, k)).flatten(1, 2), stats


class Retrieval:
    """One forward's retrieved neighbours: encoded on first use (at the first CCA layer), then shared."""

    def __init__(self, encoder: NeighbourEncoder, neighbours: torch.Tensor, embed: nn.Embedding) -> None:
        self.encoder, self.neighbours, self.embed = encoder, neighbours, embed
        self._memory: torch.Tensor | None = None
        self.moe_stats: list = []

    @classmethod
    def start(cls, model: nn.Module, neighbours: torch.Tensor, length: int, cache) -> Retrieval:
        """Check ``neighbours`` against the model and an input of ``length`` tokens."""
        encoder = model.retro_encoder
        if encoder is None:
            raise InputError("neighbours were given to a model without retrieval layers ([retro] enabled = false)")
        if cache is not None:
            raise InputError("a RETRO model runs without a KV cache (each forward sees the whole sequence)")
        m = encoder.chunk_size
        if neighbours.dim() != 4 or neighbours.shape[1] != length // m:
            raise InputError(
                f"neighbours must be [batch, {length // m} complete chunks of {m} tokens, k, r] for {length} "
                f"tokens, got {list(neighbours.shape)}"
            )
        return cls(encoder, neighbours, model.tok_emb)

    def memory(self, h: torch.Tensor) -> torch.Tensor:
        if self._memory is None:
            self._memory, self.moe_stats = self.encoder(self.neighbours, h, self.embed)
        return self._memory


def add_retrieval(model: nn.Module, retro: RetroConfig) -> NeighbourEncoder:
    """Give ``model`` (a ``Transformer``) its CCA sublayers and return the neighbour encoder it should own."""
    encoder = NeighbourEncoder(model.cfg, model.moe_cfg, retro)
    for i in retro.cca_layers(model.cfg.n_layers):
        model.layers[i].cross = ChunkedCrossAttention(model.cfg, encoder.cfg.d_model, retro.chunk_size)
    return encoder


def is_retrieval_parameter(name: str) -> bool:
    """RETRO's own parameters: the neighbour encoder and the decoder's cross sublayers."""
    return name.startswith("retro_encoder.") or ".cross." in f".{name}"


def freeze_decoder(model: nn.Module) -> None:
    """RETRO-fitting: only the retrieval parameters train."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_retrieval_parameter(name))
