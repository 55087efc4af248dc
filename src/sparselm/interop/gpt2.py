"""LayerNorm + learned absolute positions + GELU (dense) <-> ``GPT2LMHeadModel``.

GPT-2 keeps its linear layers as ``Conv1D`` ([in, out], the transpose of ``nn.Linear``) and fuses q/k/v into one
``c_attn`` ([d, 3d], q then k then v). Its GELU ``gelu_new`` is the tanh approximation sparselm's GELU uses, its
dropouts sit where sparselm's do (embeddings, attention probabilities, both residual branches), and every layer
has biases: a bias-free sparselm model exports them as zeros, and an import whose biases are all exactly zero
comes back bias-free, so both round trips are exact.
"""

from __future__ import annotations

import torch

from sparselm.config import Config, ModelConfig, MoEConfig
from sparselm.interop.mapping import (
    FILE,
    MEMORY,
    Mapping,
    Target,
    check_common_export,
    hf_field,
    refuse,
    same,
    transposed,
    zeros,
)

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class GPT2(Mapping):
    name = "gpt2"
    architecture = "GPT2LMHeadModel"
    model_type = "gpt2"
    base_prefix = "transformer."

    def check_export(self, cfg: Config) -> None:
        check_common_export(cfg, position="absolute", norm="layernorm", ffn="gelu", allow_bias=True, allow_dropout=True)
        if cfg.moe.enabled:
            refuse(f"moe.num_experts={cfg.moe.num_experts} (GPT-2 is dense)")
        if cfg.model.qk_norm:
            refuse("model.qk_norm=true (GPT-2 has no query/key norm)")

    def hf_config(self, cfg: Config) -> dict:
        m = cfg.model
        return {
            "vocab_size": m.vocab_size,
            "n_positions": m.max_seq_len,
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.d_ff,
            "activation_function": "gelu_new",
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout,
            "layer_norm_epsilon": m.norm_eps,
            "initializer_range": m.init_std,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": m.tie_embeddings,
            "use_cache": True,
        }

    def export_targets(self, cfg: Config, layout: str = FILE) -> list[Target]:
        m = cfg.model
        d, f = m.d_model, m.d_ff

        def bias(name: str, source: str, width: int) -> Target:
            return same(name, source) if m.bias else zeros(name, (width,))

        targets = [same("transformer.wte.weight", "tok_emb.weight"), same("transformer.wpe.weight", "pos_emb.weight")]
        for i in range(m.n_layers):
            hf, sl = f"transformer.h.{i}", f"layers.{i}"
            qkv = tuple(f"{sl}.attn.{p}_proj.weight" for p in "qkv")
            qkv_bias = tuple(f"{sl}.attn.{p}_proj.bias" for p in "qkv")
            targets += [
                same(f"{hf}.ln_1.weight", f"{sl}.attn_norm.weight"),
                bias(f"{hf}.ln_1.bias", f"{sl}.attn_norm.bias", d),
                Target(f"{hf}.attn.c_attn.weight", qkv, lambda q, k, v: torch.cat((q.t(), k.t(), v.t()), dim=1)),
                Target(f"{hf}.attn.c_attn.bias", qkv_bias, lambda *b: torch.cat(b))
                if m.bias
                else zeros(f"{hf}.attn.c_attn.bias", (3 * d,)),
                transposed(f"{hf}.attn.c_proj.weight", f"{sl}.attn.o_proj.weight"),
                bias(f"{hf}.attn.c_proj.bias", f"{sl}.attn.o_proj.bias", d),
                same(f"{hf}.ln_2.weight", f"{sl}.ffn_norm.weight"),
                bias(f"{hf}.ln_2.bias", f"{sl}.ffn_norm.bias", d),
                transposed(f"{hf}.mlp.c_fc.weight", f"{sl}.ffn.up.weight"),
                bias(f"{hf}.mlp.c_fc.bias", f"{sl}.ffn.up.bias", f),
                transposed(f"{hf}.mlp.c_proj.weight", f"{sl}.ffn.down.weight"),
                bias(f"{hf}.mlp.c_proj.bias", f"{sl}.ffn.down.bias", d),
            ]
        targets += [same("transformer.ln_f.weight", "norm.weight"), bias("transformer.ln_f.bias", "norm.bias", d)]
        if not m.tie_embeddings:
            targets.append(same("lm_head.weight", "lm_head.weight"))
        elif layout == MEMORY:
            targets.append(same("lm_head.weight", "tok_emb.weight"))
        return targets

    def import_config(self, hf: dict) -> Config:
        act = hf.get("activation_function", "gelu_new")
        if act not in TANH_GELUS:
            refuse(f"activation_function={act!r} (sparselm's GELU is the tanh approximation, gelu_new)")
        if not hf.get("scale_attn_weights", True):
            refuse("scale_attn_weights=false (sparselm scales attention scores by 1/sqrt(head_dim))")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            refuse("scale_attn_by_inverse_layer_idx=true (attention scaled per layer)")
        if hf.get("add_cross_attention", False):
            refuse("add_cross_attention=true (cross-attention layers)")
        d = hf_field(hf, "n_embd")
        dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(dropouts) > 1:
            refuse(f"resid_pdrop, embd_pdrop and attn_pdrop differ ({sorted(dropouts)}): sparselm has one dropout")
        model = ModelConfig(
            vocab_size=hf_field(hf, "vocab_size"),
            d_model=d,
            n_layers=hf_field(hf, "n_layer"),
            n_heads=hf_field(hf, "n_head"),
            d_ff=hf.get("n_inner") or 4 * d,
            max_seq_len=hf_field(hf, "n_positions"),
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            position="absolute",
            ffn="gelu",
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bias=True,
            dropout=float(dropouts.pop()),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        return Config(model=model, moe=MoEConfig())

    def import_targets(self, cfg: Config, hf: dict, keys: set[str]) -> list[Target]:
        m = cfg.model
        d = m.d_model
        targets = [same("tok_emb.weight", "transformer.wte.weight"), same("pos_emb.weight", "transformer.wpe.weight")]
        for i in range(m.n_layers):
            hf_p, sl = f"transformer.h.{i}", f"layers.{i}"
            c_attn, c_attn_bias = f"{hf_p}.attn.c_attn.weight", f"{hf_p}.attn.c_attn.bias"
            for j, p in enumerate("qkv"):
                part = slice(j * d, (j + 1) * d)
                targets.append(Target(f"{sl}.attn.{p}_proj.weight", (c_attn,), lambda w, part=part: w[:, part].t()))
                targets.append(Target(f"{sl}.attn.{p}_proj.bias", (c_attn_bias,), lambda b, part=part: b[part]))
            targets += [
                transposed(f"{sl}.attn.o_proj.weight", f"{hf_p}.attn.c_proj.weight"),
                same(f"{sl}.attn.o_proj.bias", f"{hf_p}.attn.c_proj.bias"),
                transposed(f"{sl}.ffn.up.weight", f"{hf_p}.mlp.c_fc.weight"),
                same(f"{sl}.ffn.up.bias", f"{hf_p}.mlp.c_fc.bias"),
                transposed(f"{sl}.ffn.down.weight", f"{hf_p}.mlp.c_proj.weight"),
                same(f"{sl}.ffn.down.bias", f"{hf_p}.mlp.c_proj.bias"),
            ]
            for norm, ln in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                targets += [same(f"{sl}.{norm}.weight", f"{hf_p}.{ln}.weight")]
                targets += [same(f"{sl}.{norm}.bias", f"{hf_p}.{ln}.bias")]
        targets += [same("norm.weight", "transformer.ln_f.weight"), same("norm.bias", "transformer.ln_f.bias")]
        if not m.tie_embeddings:
            targets.append(same("lm_head.weight", "lm_head.weight"))
        return targets

    def ignored(self, cfg: Config, hf: dict, keys: set[str]) -> set[str]:
        # Causal-mask buffers some GPT-2 checkpoints carry; a tied checkpoint may also store the output layer.
        buffers = {k for k in keys if k.endswith((".attn.bias", ".attn.masked_bias"))}
        return buffers | ({"lm_head.weight"} if cfg.model.tie_embeddings else set())

    def simplify(self, cfg: Config, tensors: dict[str, torch.Tensor]) -> None:
        """Biases that are all exactly zero (e.g. a bias-free sparselm model's export) come back as no biases."""
        biases = [k for k in tensors if k.endswith(".bias")]
        if biases and not any(bool(tensors[k].any()) for k in biases):
            for k in biases:
                del tensors[k]
            cfg.model.bias = False
