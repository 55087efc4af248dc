"""MoE in every layer with renormalised top-k gates (GLaM/GShard top-2) <-> ``MixtralForCausalLM``.

Mixtral always renormalises the top-k gate weights to sum to one, so it holds sparselm models with
``moe.moe_every = 1``, ``moe.renormalize = true`` and ``top_k >= 2`` (a top-1 Mixtral gives every token the gate
1.0, which sparselm's top-1 does not: it keeps the router probability, as Switch does). Both route with a softmax
over ``x W_router^T`` and take the top k of the probabilities. Files use the hub's per-expert names
(``block_sparse_moe.experts.{e}.w1/w3/w2`` = gate/up/down); transformers 5 holds them fused under ``mlp``.
"""

from __future__ import annotations

from sparselm.config import Config, MoEConfig
from sparselm.interop.llama import backbone_export, backbone_hf_config, backbone_import, backbone_model_config
from sparselm.interop.mapping import (
    FILE,
    MEMORY,
    Mapping,
    Target,
    check_common_export,
    expert_export,
    expert_import,
    head_layout,
    hf_field,
    refuse,
    same,
)

FILE_EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


class Mixtral(Mapping):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    gguf = True

    def check_export(self, cfg: Config) -> None:
        check_common_export(cfg, position="rope", norm="rmsnorm", ffn="swiglu", allow_bias=False, allow_dropout=False)
        e = cfg.moe
        if not e.enabled:
            refuse("moe.num_experts=0 (Mixtral is an MoE)")
        if e.moe_every != 1:
            refuse(f"moe.moe_every={e.moe_every} (Mixtral has an MoE in every layer)")
        if e.top_k < 2 or not e.renormalize:
            refuse(
                f"moe.top_k={e.top_k}, moe.renormalize={str(e.renormalize).lower()} "
                "(Mixtral renormalises top-k gates, k >= 2)"
            )
        if e.shared_expert:
            refuse("moe.shared_expert=true (Mixtral has no shared expert)")
        if cfg.model.qk_norm:
            refuse("model.qk_norm=true (Mixtral has no query/key norm)")

    def hf_config(self, cfg: Config) -> dict:
        e = cfg.moe
        return {
            **backbone_hf_config(cfg),
            "intermediate_size": e.d_ff_expert or cfg.model.d_ff,
            "num_local_experts": e.num_experts,
            "num_experts_per_tok": e.top_k,
            "router_aux_loss_coef": e.aux_loss_coef,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }

    def export_targets(self, cfg: Config, layout: str = FILE) -> list[Target]:
        targets = backbone_export(cfg, layout, attention_bias=False)
        block = "mlp" if layout == MEMORY else "block_sparse_moe"
        for i in range(cfg.model.n_layers):
            hf, sl = f"model.layers.{i}.{block}", f"layers.{i}.ffn"
            targets.append(same(f"{hf}.gate.weight", f"{sl}.router.weight"))
            targets += expert_export(f"{hf}.experts", f"{sl}.experts", cfg.moe.num_experts, layout, FILE_EXPERT_NAMES)
        return targets

    def import_config(self, hf: dict) -> Config:
        model, _ = backbone_model_config(hf, tie_default=False)
        top_k = hf_field(hf, "num_experts_per_tok")
        if top_k < 2:
            refuse(
                f"num_experts_per_tok={top_k}: Mixtral renormalises a single gate to 1.0, sparselm's top-1 keeps "
                "the router probability"
            )
        if hf.get("router_jitter_noise", 0.0):
            refuse(f"router_jitter_noise={hf['router_jitter_noise']} (jitter on the expert inputs too)")
        moe = MoEConfig(
            num_experts=hf_field(hf, "num_local_experts"),
            top_k=top_k,
            moe_every=1,
            renormalize=True,
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
        )
        return Config(model=model, moe=moe)

    def import_targets(self, cfg: Config, hf: dict, keys: set[str]) -> list[Target]:
        kv = head_layout(hf, cfg.model.d_model, cfg.model.n_heads)
        targets = backbone_import(cfg, kv, keys)
        for i in range(cfg.model.n_layers):
            fused = f"model.layers.{i}.mlp"
            block = fused if f"{fused}.experts.gate_up_proj" in keys else f"model.layers.{i}.block_sparse_moe"
            sl = f"layers.{i}.ffn"
            targets.append(same(f"{sl}.router.weight", f"{block}.gate.weight"))
            targets += expert_import(
                f"{block}.experts", f"{sl}.experts", cfg.moe.num_experts, cfg.model.d_ff, keys, FILE_EXPERT_NAMES
            )
        return targets
