"""Decoder-only transformer with pre-norm blocks; every ``moe_every``-th block swaps its dense FFN for an MoE.

Single-device code on purpose: data, tensor and expert parallelism are applied to this module from outside.
The forward returns logits, the LM loss and, separately, the MoE auxiliary losses and per-layer routing statistics,
so the training loop decides how to weight them and nothing hides in module state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sparselm.config import ModelConfig, MoEConfig, RetroConfig
from sparselm.errors import InputError
from sparselm.model.attention import AttentionCache, KVCache, causal_slots
from sparselm.model.block import Block
from sparselm.model.layers import Linear, make_norm, rope_cos_sin
from sparselm.model.moe import MoE, MoEStats
from sparselm.model.retro import Retrieval, add_retrieval
from sparselm.ops import linear, linear_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when targets were given: the loss is computed without them
    loss: torch.Tensor | None  # mean next-token cross-entropy over targets != -100
    aux_loss: torch.Tensor  # Switch load-balancing loss, mean or sum over MoE layers (moe.layer_losses; 0 if dense)
    z_loss: torch.Tensor  # router z-loss, mean or sum over MoE layers (0 for a dense model)
    moe_stats: list[MoEStats] = field(default_factory=list)  # one entry per MoE layer, in depth order


def relative_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucketing of distances >= 0: exact below num_buckets/2, log-spaced up to max_distance."""
    exact = num_buckets // 2
    log_part = torch.log(distance.float().clamp(min=1) / exact) / math.log(max(max_distance / exact, 1.0 + 1e-6))
    large = (exact + (log_part * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(distance < exact, distance, large)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None, retro: RetroConfig | None = None) -> None:
        super().__init__()
        moe = moe if moe is not None else MoEConfig()
        self.cfg = cfg
        self.moe_cfg = moe
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "absolute" else None
        self.rel_bias = nn.Embedding(cfg.relative_buckets, cfg.n_heads) if cfg.position == "relative" else None
        moe_layers = set(moe.layer_indices(cfg.n_layers))
        self.layers = nn.ModuleList(Block(cfg, moe, i in moe_layers) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.retro_encoder: nn.Module | None = None
        if retro is not None and retro.enabled:
            self.retro_encoder = add_retrieval(self, retro)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; callable after ``to_empty`` when the model was built on the meta device."""
        std = self.cfg.init_std
        # Residual-branch outputs get a smaller init so the residual stream's variance does not grow with depth.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "down"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif (
                isinstance(module, nn.LayerNorm)
                or hasattr(module, "reset_parameters")
                and not isinstance(module, nn.Linear)
            ):
                module.reset_parameters()
        blocks = [m for m in self.modules() if isinstance(m, Block)]  # the neighbour encoder's blocks too
        for block in blocks:
            if isinstance(block.ffn, MoE):
                experts = block.ffn.experts
                scale = self.moe_cfg.expert_init_scale
                nn.init.normal_(experts.w_up, std=std * scale)
                if experts.w_gate is not None:
                    nn.init.normal_(experts.w_gate, std=std * scale)
                nn.init.normal_(experts.w_down, std=out_std * scale)
                for b in (experts.b_up, experts.b_down):
                    if b is not None:
                        nn.init.zeros_(b)
            if block.attn.position == "xl":
                nn.init.zeros_(block.attn.u)
                nn.init.zeros_(block.attn.v)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        last_only: bool = False,
        output_rows: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None,
    ) -> ModelOutput:
        """``idx`` [B, T] token ids. ``positions`` [B, T] (default: 0.. or continuing a ``KVCache``), ``valid`` [B, T]
        False for padding. With ``cache`` the new keys/values are stored in it and the cache says which keys each
        query attends to (see ``AttentionCache``). Logits: [B, T, V]; [B, 1, V] with ``last_only``; [R, V] for the
        tokens ``output_rows`` [R] of the flattened [B * T] input with ``output_rows`` (the others are not computed).
        ``neighbours`` [B, T // m, k, r] token ids retrieved for each complete chunk of m tokens (a RETRO model
        only; None runs it without retrieval, exactly as the plain decoder).
        """
        B, T = idx.shape
        if positions is None:
            past = cache.length if cache is not None else 0
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise InputError(f"position {int(positions.max())} exceeds model.max_seq_len={self.cfg.max_seq_len}")

        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)

        attn_kwargs = self._attention_inputs(positions, valid, cache)
        token_valid = None if bool(valid.all()) else valid
        retrieval = None
        if neighbours is not None:
            retrieval = Retrieval.start(self, neighbours, T, cache)
        stats: list[MoEStats] = []
        for i, block in enumerate(self.layers):
            x, layer_stats = block(x, token_valid, retrieval, layer=i, **attn_kwargs)
            if layer_stats is not None:
                stats.append(layer_stats)
        if retrieval is not None:
            stats.extend(retrieval.moe_stats)  # the neighbour encoder's MoE layers, after the decoder's
        if cache is not None:
            cache.advance(T)

        if output_rows is not None:
            x = x.flatten(0, 1).index_select(0, output_rows)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits, loss = None, None
        if targets is None:
            logits = self.lm_head(x) if self.lm_head is not None else linear(x, self.tok_emb.weight)
        else:
            # = F.cross_entropy(F.linear(x, head).float(), targets), in chunks of rows (no [tokens, vocab] tensors);
            # it reads the head's weight directly, so module hooks on lm_head see only the no-targets path.
            head = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
            loss = linear_cross_entropy(x.flatten(0, 1), head, targets.flatten(), ignore_index=-100)
        zero = torch.zeros((), device=idx.device)
        if stats:
            reduce = torch.sum if self.moe_cfg.layer_losses == "sum" else torch.mean
            aux, z = reduce(torch.stack([s.aux_loss for s in stats])), reduce(torch.stack([s.z_loss for s in stats]))
        else:
            aux = z = zero
        return ModelOutput(logits, loss, aux, z, stats)

    def _attention_inputs(self, positions, valid, cache: AttentionCache | None) -> dict:
        """Everything attention needs besides x: RoPE tables, the additive mask/bias and XL distances (one set per
        key group of the cache, or one for the input itself), the cache."""
        cfg = self.cfg
        kwargs: dict = {"cache": cache}
        if cfg.position == "rope":
            kwargs["rope"] = rope_cos_sin(positions, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        if cache is not None:
            groups = cache.groups(positions, valid)
            plain = cfg.position not in ("relative", "xl")  # a causal tail needs no mask: attention knows it
            masks = [None if plain and g.causal_tail else g.allowed for g in groups]
            kwargs["groups"] = [
                (g, *self._bias(g.q_positions, g.k_positions, m)) for g, m in zip(groups, masks, strict=True)
            ]
            return kwargs
        if bool(valid.all()) and cfg.position not in ("relative", "xl"):
            return kwargs  # plain causal attention: SDPA's is_causal fast path
        allowed = causal_slots(0, positions.shape[1], valid)
        kwargs["attn_bias"], kwargs["distance"] = self._bias(positions, positions, allowed)
        return kwargs

    def _bias(self, q_pos, k_pos, allowed) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Additive attention bias [B, 1 or H, Tq, Tk] (-inf where not ``allowed``, plus T5's learned relative bias)
        and, for ``xl``, the query-minus-key distances [B, Tq, Tk]; (None, None) when there is nothing to add."""
        cfg = self.cfg
        if allowed is None:  # the group sees all of its keys
            if cfg.position not in ("relative", "xl"):
                return None, None
            allowed = torch.ones(*q_pos.shape, k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
        bias = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf")).unsqueeze(1)
        distance = (q_pos.unsqueeze(2) - k_pos.unsqueeze(1)).clamp(min=0)  # [B, Tq, Tk]
        if self.rel_bias is not None:
            buckets = relative_bucket(distance, cfg.relative_buckets, cfg.relative_max_distance)
            bias = bias + self.rel_bias(buckets).permute(0, 3, 1, 2)
        return bias, (distance if cfg.position == "xl" else None)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.cfg
        dtype = dtype or self.tok_emb.weight.dtype
        hd = cfg.d_model // cfg.n_heads
        return KVCache(cfg.n_layers, batch, cfg.n_heads, max_len, hd, dtype, self.tok_emb.weight.device)
