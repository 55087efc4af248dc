"""Dense RMSNorm + RoPE + SwiGLU models <-> ``LlamaForCausalLM``; also the decoder backbone (embeddings,
attention, norms, output layer) that the Mixtral and Qwen MoE mappings share.

Tensor names line up one to one: sparselm's ``nn.Linear`` weights are [out, in] like transformers', and both
apply RoPE as "rotate half" on unpermuted q/k projections. Grouped-query checkpoints import exactly by giving
every query head its own copy of its key/value head (sparselm's attention has as many k/v heads as q heads).
Biases: sparselm's ``model.bias`` puts one on every projection, so ``attention_bias`` and ``mlp_bias`` are both
set on export; on import either one turns it on and the projections the checkpoint has no bias for get zeros.
"""

from __future__ import annotations

from sparselm.config import Config, ModelConfig, MoEConfig
from sparselm.interop.mapping import (
    FILE,
    MEMORY,
    Mapping,
    Target,
    check_common_export,
    head_layout,
    hf_field,
    no_sliding_window,
    refuse,
    repeat_kv,
    rope_theta,
    same,
    zeros,
)

PROJECTIONS = ("q", "k", "v", "o")


def backbone_hf_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4 and other readers
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # transformers 5
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "use_cache": True,
    }


def backbone_export(cfg: Config, layout: str, attention_bias: bool, o_bias: bool = True) -> list[Target]:
    """Embeddings, attention, norms and output layer; the FFN of each layer is the caller's."""
    m = cfg.model
    targets = [same("model.embed_tokens.weight", "tok_emb.weight")]
    for i in range(m.n_layers):
        hf, sl = f"model.layers.{i}", f"layers.{i}"
        targets.append(same(f"{hf}.input_layernorm.weight", f"{sl}.attn_norm.weight"))
        targets.append(same(f"{hf}.post_attention_layernorm.weight", f"{sl}.ffn_norm.weight"))
        for p in PROJECTIONS:
            targets.append(same(f"{hf}.self_attn.{p}_proj.weight", f"{sl}.attn.{p}_proj.weight"))
            if attention_bias and (p != "o" or o_bias):
                targets.append(same(f"{hf}.self_attn.{p}_proj.bias", f"{sl}.attn.{p}_proj.bias"))
        if m.qk_norm:
            targets.append(same(f"{hf}.self_attn.q_norm.weight", f"{sl}.attn.q_norm.weight"))
            targets.append(same(f"{hf}.self_attn.k_norm.weight", f"{sl}.attn.k_norm.weight"))
    targets.append(same("model.norm.weight", "norm.weight"))
    if not m.tie_embeddings:
        targets.append(same("lm_head.weight", "lm_head.weight"))
    elif layout == MEMORY:
        targets.append(same("lm_head.weight", "tok_emb.weight"))  # the tied module's own name, same tensor
    return targets


def dense_ffn_export(hf: str, sl: str, bias: bool) -> list[Target]:
    targets = [same(f"{hf}.{p}_proj.weight", f"{sl}.{p}.weight") for p in ("gate", "up", "down")]
    if bias:
        targets += [same(f"{hf}.{p}_proj.bias", f"{sl}.{p}.bias") for p in ("gate", "up", "down")]
    return targets


def backbone_model_config(hf: dict, *, tie_default: bool, qk_norm: bool = False) -> tuple[ModelConfig, int]:
    """The [model] section shared by the Llama-family imports (d_ff is the caller's) and the k/v head count."""
    hidden = hf_field(hf, "hidden_size")
    heads = hf_field(hf, "num_attention_heads")
    kv = head_layout(hf, hidden, heads)
    max_len = hf_field(hf, "max_position_embeddings")
    no_sliding_window(hf, max_len)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        refuse(f"hidden_act={act!r} (sparselm's SwiGLU uses silu)")
    if hf.get("pretraining_tp", 1) != 1:
        refuse(f"pretraining_tp={hf['pretraining_tp']} (split linear layers)")
    if hf.get("attention_dropout", 0.0):
        refuse(f"attention_dropout={hf['attention_dropout']} without residual dropout")
    model = ModelConfig(
        vocab_size=hf_field(hf, "vocab_size"),
        d_model=hidden,
        n_layers=hf_field(hf, "num_hidden_layers"),
        n_heads=heads,
        d_ff=hf_field(hf, "intermediate_size"),
        max_seq_len=max_len,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        position="rope",
        rope_theta=rope_theta(hf),
        ffn="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
        qk_norm=qk_norm,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    return model, kv


def bias_or_zeros(name: str, source: str, keys: set[str], shape: tuple[int, ...]) -> Target:
    return same(name, source) if source in keys else zeros(name, shape)


def backbone_import(cfg: Config, kv_heads: int, keys: set[str]) -> list[Target]:
    m = cfg.model
    d, heads = m.d_model, m.n_heads
    targets = [same("tok_emb.weight", "model.embed_tokens.weight")]
    for i in range(m.n_layers):
        hf, sl = f"model.layers.{i}", f"layers.{i}"
        targets.append(same(f"{sl}.attn_norm.weight", f"{hf}.input_layernorm.weight"))
        targets.append(same(f"{sl}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight"))
        for p in PROJECTIONS:
            source = f"{hf}.self_attn.{p}_proj.weight"
            if p in ("k", "v"):
                targets.append(Target(f"{sl}.attn.{p}_proj.weight", (source,), lambda w: repeat_kv(w, kv_heads, heads)))
            else:
                targets.append(same(f"{sl}.attn.{p}_proj.weight", source))
            if m.bias:
                bias = f"{hf}.self_attn.{p}_proj.bias"
                if p in ("k", "v") and bias in keys:
                    targets.append(Target(f"{sl}.attn.{p}_proj.bias", (bias,), lambda b: repeat_kv(b, kv_heads, heads)))
                else:
                    targets.append(bias_or_zeros(f"{sl}.attn.{p}_proj.bias", bias, keys, (d,)))
        if m.qk_norm:
            targets.append(same(f"{sl}.attn.q_norm.weight", f"{hf}.self_attn.q_norm.weight"))
            targets.append(same(f"{sl}.attn.k_norm.weight", f"{hf}.self_attn.k_norm.weight"))
    targets.append(same("norm.weight", "model.norm.weight"))
    if not m.tie_embeddings:
        targets.append(same("lm_head.weight", "lm_head.weight"))
    return targets


def dense_ffn_import(hf: str, sl: str, d_model: int, d_ff: int, bias: bool, keys: set[str]) -> list[Target]:
    targets = [same(f"{sl}.{p}.weight", f"{hf}.{p}_proj.weight") for p in ("gate", "up", "down")]
    if bias:
        for p, width in (("gate", d_ff), ("up", d_ff), ("down", d_model)):
            targets.append(bias_or_zeros(f"{sl}.{p}.bias", f"{hf}.{p}_proj.bias", keys, (width,)))
    return targets


class Llama(Mapping):
    name = "llama"
    architecture = "LlamaForCausalLM"
    model_type = "llama"
    gguf = True

    def check_export(self, cfg: Config) -> None:
        check_common_export(cfg, position="rope", norm="rmsnorm", ffn="swiglu", allow_bias=True, allow_dropout=False)
        if cfg.moe.enabled:
            refuse(f"moe.num_experts={cfg.moe.num_experts} (Llama is dense)")
        if cfg.model.qk_norm:
            refuse("model.qk_norm=true (Llama has no query/key norm)")

    def hf_config(self, cfg: Config) -> dict:
        return {
            **backbone_hf_config(cfg),
            "intermediate_size": cfg.model.d_ff,
            "attention_bias": cfg.model.bias,
            "mlp_bias": cfg.model.bias,
            "pretraining_tp": 1,
        }

    def export_targets(self, cfg: Config, layout: str = FILE) -> list[Target]:
        targets = backbone_export(cfg, layout, attention_bias=cfg.model.bias)
        for i in range(cfg.model.n_layers):
            targets += dense_ffn_export(f"model.layers.{i}.mlp", f"layers.{i}.ffn", cfg.model.bias)
        return targets

    def import_config(self, hf: dict) -> Config:
        model, _ = backbone_model_config(hf, tie_default=False)
        model.bias = bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False))
        return Config(model=model, moe=MoEConfig())

    def import_targets(self, cfg: Config, hf: dict, keys: set[str]) -> list[Target]:
        kv = head_layout(hf, cfg.model.d_model, cfg.model.n_heads)
        targets = backbone_import(cfg, kv, keys)
        m = cfg.model
        for i in range(m.n_layers):
            targets += dense_ffn_import(f"model.layers.{i}.mlp", f"layers.{i}.ffn", m.d_model, m.d_ff, m.bias, keys)
        return targets
