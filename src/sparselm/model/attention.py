"""Causal multi-head self-attention, with an optional KV cache.

Plain causal attention (no bias, no dropout; with a cache, a group of queries that are the last positions of their
keys) goes through ``sparselm.ops.causal_attention``: a C++ kernel for bf16 on CPU, ``scaled_dot_product_attention``
elsewhere; masks and biases go through ``scaled_dot_product_attention``.

Position information enters in one of three ways here (learned absolute embeddings live in the transformer):
- ``rope``: rotary embeddings applied to queries and keys;
- ``relative``: a learned per-head bias over bucketed relative distances (T5), computed once per forward by the
  transformer and passed in as ``attn_bias``;
- ``xl``: Transformer-XL relative attention (used by Gopher): a per-layer projection ``w_rel`` of sinusoidal
  distance embeddings and two learned global biases ``u`` (content) and ``v`` (position).
Shapes are never hard-coded from the config (``unflatten``/``flatten`` only), so tensor-parallel plans that shard
heads can be applied to this module from outside.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.layers import Linear, RMSNorm, apply_rope, sinusoid_table
from sparselm.ops.causal_attention import causal_attention


def causal_slots(past: int, new: int, k_valid: torch.Tensor) -> torch.Tensor:
    """Which keys each of ``new`` queries in slots ``past..`` may see, keys being slots ``0..`` of one row each:
    earlier or same slots holding real tokens (``k_valid`` [B, Tk]) -> [B, new, Tk] bool. A query always sees its
    own slot, which keeps padding rows finite (their outputs are never used)."""
    q_slot = torch.arange(past, past + new, device=k_valid.device).unsqueeze(1)
    k_slot = torch.arange(k_valid.shape[1], device=k_valid.device).unsqueeze(0)
    return ((k_slot <= q_slot) & k_valid.unsqueeze(1)) | (k_slot == q_slot)


class KeyGroup:
    """Queries that meet their keys in one attention call, and the positions their mask and biases come from.

    ``allowed`` [B, Tq, Tk] says which keys each query sees (None: every key the cache gives the group, no mask, so
    attention takes its unmasked fast path); ``causal_tail`` says that ``allowed`` is plain causal attention with
    the queries as the last Tq of the Tk keys (query i sees keys 0 .. Tk - Tq + i, no padding), which attention
    then computes without a mask where the position type adds no bias; ``q_positions`` [B, Tq] and
    ``k_positions`` [B, Tk] give the distances for relative biases. ``queries`` takes the group's queries
    [B, H, Tq, hd] out of the forward's [B', H, T, hd] queries and ``outputs`` puts the group's attention output back
    in that layout; the outputs of a forward's groups, concatenated along the token axis in order, make its whole
    output.
    This base class is the one-group case: the whole input, as it is.
    """

    causal_tail: bool = False

    def __init__(
        self,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        allowed: torch.Tensor | None,
        causal_tail: bool = False,
    ) -> None:
        self.q_positions = q_positions
        self.k_positions = k_positions
        self.allowed = allowed
        self.causal_tail = causal_tail

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        return y


class AttentionCache(Protocol):
    """Where keys and values live between forwards, and which keys each new query meets.

    The transformer calls ``groups`` once per forward (before any layer), then every attention layer ``store``s
    its new keys/values and attends each group's queries to ``keys(layer, group)``, unless ``attend`` computes the
    group's attention itself (a cache with a kernel of its own); ``advance`` ends the forward.
    ``KVCache`` (one contiguous row per sequence, for ``generate``) is one implementation; a paged cache that
    serves a packed batch of sequences of different lengths (``sparselm.serve``) is another.
    """

    def groups(self, positions: torch.Tensor, valid: torch.Tensor) -> list[KeyGroup]: ...

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def keys(self, layer: int, group: KeyGroup) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attend(self, layer: int, group: KeyGroup, q: torch.Tensor) -> torch.Tensor | None:
        """The group's attention output [B, H, Tq, hd] from the forward's queries ``q``, or None: attention reads
        ``keys`` and computes it."""
        ...

    def advance(self, num_tokens: int) -> None: ...


class KVCache:
    """Pre-allocated keys/values for every layer plus, per slot, its position and whether it is a real token.

    Every row gets the same number of new slots per forward; ``length`` slots of each row are filled."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        self.k = torch.zeros(n_layers, batch, n_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def append_meta(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        end = self.length + positions.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.positions[:, self.length : end] = positions
        self.valid[:, self.length : end] = valid

    def groups(self, positions: torch.Tensor, valid: torch.Tensor) -> list[KeyGroup]:
        self.append_meta(positions, valid)
        end = self.length + positions.shape[1]
        valid = self.valid[:, :end]
        allowed = causal_slots(self.length, positions.shape[1], valid)
        return [KeyGroup(positions, self.positions[:, :end], allowed, causal_tail=bool(valid.all()))]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v

    def keys(self, layer: int, group: KeyGroup) -> tuple[torch.Tensor, torch.Tensor]:
        end = group.k_positions.shape[1]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, group: KeyGroup, q: torch.Tensor) -> None:
        return None

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        bias: bool = False,
        position: str = "rope",
        dropout: float = 0.0,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.position = position
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model, bias=bias)
        self.k_proj = Linear(d_model, d_model, bias=bias)
        self.v_proj = Linear(d_model, d_model, bias=bias)
        self.o_proj = Linear(d_model, d_model, bias=bias)
        # QK-norm (Qwen3, OLMoE): RMSNorm over each head's query and key, one weight vector shared by all heads.
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        if position == "xl":
            self.w_rel = Linear(d_model, d_model, bias=False)
            self.u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
            self.v = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # [B, T, D] -> [B, H, T, hd]

    def _xl_bias(self, q: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Position term ``(q + v) . W_rel r_(i-j)`` for every query/key pair -> [B, H, Tq, Tk], pre-scaled."""
        max_distance = int(distance.max().item()) + 1
        rel = self.w_rel(sinusoid_table(max_distance, self.w_rel.in_features, q.device).to(q.dtype))
        rel = rel.unflatten(-1, (-1, self.head_dim)).transpose(0, 1)  # [H, L, hd]
        scores = torch.matmul(q + self.v.unsqueeze(1).to(q.dtype), rel.transpose(-1, -2))  # [B, H, Tq, L]
        index = distance.unsqueeze(1).expand(-1, scores.shape[1], -1, -1)
        return torch.gather(scores, -1, index) / self.head_dim**0.5

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_bias: torch.Tensor | None = None,
        distance: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        groups: list[tuple[KeyGroup, torch.Tensor, torch.Tensor | None]] = (),
        layer: int = 0,
    ) -> torch.Tensor:
        """Without a cache, ``attn_bias`` is an additive float mask [B or 1, H or 1, Tq, Tk] (None means plain
        causal) and ``distance`` [B, Tq, Tk] holds query-minus-key positions (clamped at 0) for ``xl``. With a
        cache, every (group, bias, distance) of ``groups`` is one attention call over the keys the cache holds (no
        bias: the group's queries see all of those keys, or, for a ``causal_tail`` group, each its keys so far)."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = self._attend(q, k, v, attn_bias, distance)
        else:
            cache.store(layer, k, v)
            outputs = []
            for group, bias, dist in groups:
                y_group = cache.attend(layer, group, q)
                if y_group is None:
                    k_all, v_all = cache.keys(layer, group)
                    q_group = group.queries(q)
                    if k_all.dtype != q.dtype:  # a cache kept in another dtype than the weights
                        if self.position == "xl":  # its position term multiplies queries with weights: keys follow q
                            k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
                        else:
                            q_group = q_group.to(k_all.dtype)
                    if bias is None and group.causal_tail:
                        y_group = causal_attention(q_group, k_all, v_all).to(q.dtype)
                    else:
                        y_group = self._attend(q_group, k_all, v_all, bias, dist, causal=False).to(q.dtype)
                outputs.append(group.outputs(y_group))
            y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return self.o_proj(y.transpose(1, 2).flatten(-2))

    def _attend(self, q, k, v, attn_bias, distance, causal: bool = True) -> torch.Tensor:
        """``attn_bias`` None: plain causal attention, or (``causal`` False) every query sees every key."""
        if self.position == "xl":
            attn_bias = attn_bias + self._xl_bias(q, distance)
            q = q + self.u.unsqueeze(1).to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if attn_bias is None:
            if causal and dropout == 0.0:
                return causal_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=dropout)
