"""MoE every k-th layer, with or without renormalised gates, and query/key norm <-> ``Qwen3MoeForCausalLM``.

Qwen3-MoE places its MoE layers with ``decoder_sparse_step`` (layer i is MoE when (i + 1) % step == 0, sparselm's
``moe.moe_every`` rule) minus ``mlp_only_layers``, and ``norm_topk_prob`` says whether the top-k gates are
renormalised (Switch/DeepSpeed-MoE top-1 keeps the router probability: ``norm_topk_prob = false``). Its attention
always normalises each head's queries and keys (``q_norm``/``k_norm``), so it holds sparselm models with
``model.qk_norm = true``; models without it go to Qwen2-MoE, which has no such norm.

``QwenMoE`` is the part both Qwen mappings share: placement, routing flags, dense and MoE layer tensors.
"""

from __future__ import annotations

from sparselm.config import Config, MoEConfig
from sparselm.interop.llama import (
    backbone_export,
    backbone_hf_config,
    backbone_import,
    backbone_model_config,
    dense_ffn_export,
    dense_ffn_import,
)
from sparselm.interop.mapping import (
    FILE,
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


def num_experts(hf: dict) -> int:
    """transformers 5 writes Qwen3-MoE's ``num_experts`` as ``num_local_experts`` (an attribute alias)."""
    return int(hf.get("num_experts") or hf.get("num_local_experts") or 0)


def moe_every_from(hf: dict, n_layers: int) -> int:
    """sparselm's ``moe.moe_every`` for the layers ``decoder_sparse_step`` and ``mlp_only_layers`` make MoE;
    0 when there are none (a dense model). Placements no single ``moe_every`` gives are refused."""
    step = hf.get("decoder_sparse_step") or 1
    only = set(hf.get("mlp_only_layers") or [])
    layers = [i for i in range(n_layers) if num_experts(hf) > 0 and i not in only and (i + 1) % step == 0]
    if not layers:
        return 0
    every = layers[0] + 1
    if layers != [i for i in range(n_layers) if (i + 1) % every == 0]:
        refuse(
            f"decoder_sparse_step={step} with mlp_only_layers={sorted(only)} puts experts in layers {layers}, "
            "which no moe.moe_every gives (sparselm places an MoE in every moe_every-th layer)"
        )
    return every


class QwenMoE(Mapping):
    """Shared by the Qwen2-MoE and Qwen3-MoE mappings; not registered itself."""

    qk_norm = False  # whether the architecture normalises queries and keys (Qwen3) or not (Qwen2)

    def check_export(self, cfg: Config) -> None:
        check_common_export(cfg, position="rope", norm="rmsnorm", ffn="swiglu", allow_bias=False, allow_dropout=False)
        if not cfg.moe.enabled:
            refuse(f"moe.num_experts=0 ({self.architecture} is an MoE)")

    def hf_config(self, cfg: Config) -> dict:
        m, e = cfg.model, cfg.moe
        return {
            **backbone_hf_config(cfg),
            "intermediate_size": m.d_ff,
            "moe_intermediate_size": e.d_ff_expert or m.d_ff,
            "num_experts": e.num_experts,
            "num_experts_per_tok": e.top_k,
            "decoder_sparse_step": e.moe_every,
            "mlp_only_layers": [],
            "norm_topk_prob": e.renormalize and e.top_k > 1,
            "router_aux_loss_coef": e.aux_loss_coef,
            "use_sliding_window": False,
            "sliding_window": None,
        }

    def moe_layer_export(self, cfg: Config, i: int, layout: str) -> list[Target]:
        hf, sl = f"model.layers.{i}.mlp", f"layers.{i}.ffn"
        return [same(f"{hf}.gate.weight", f"{sl}.router.weight")] + expert_export(
            f"{hf}.experts", f"{sl}.experts", cfg.moe.num_experts, layout
        )

    def export_targets(self, cfg: Config, layout: str = FILE) -> list[Target]:
        targets = backbone_export(cfg, layout, attention_bias=False)
        moe_layers = set(cfg.moe.layer_indices(cfg.model.n_layers))
        for i in range(cfg.model.n_layers):
            if i in moe_layers:
                targets += self.moe_layer_export(cfg, i, layout)
            else:
                targets += dense_ffn_export(f"model.layers.{i}.mlp", f"layers.{i}.ffn", bias=False)
        return targets

    def import_config(self, hf: dict) -> Config:
        model, _ = backbone_model_config(hf, tie_default=False, qk_norm=self.qk_norm)
        every = moe_every_from(hf, model.n_layers)
        if not every:
            return Config(model=model, moe=MoEConfig())
        top_k = hf_field(hf, "num_experts_per_tok")
        norm = bool(hf.get("norm_topk_prob", False))
        if norm and top_k == 1:
            refuse(
                "norm_topk_prob=true with num_experts_per_tok=1 gives every token the gate 1.0; sparselm's top-1 "
                "keeps the router probability"
            )
        d_ff_expert = hf_field(hf, "moe_intermediate_size")
        moe = MoEConfig(
            num_experts=num_experts(hf),
            top_k=top_k,
            moe_every=every,
            d_ff_expert=d_ff_expert if d_ff_expert != model.d_ff else 0,
            renormalize=norm,
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
        )
        return Config(model=model, moe=moe)

    def moe_layer_import(self, cfg: Config, i: int, hf: dict, keys: set[str]) -> list[Target]:
        hf_prefix, sl = f"model.layers.{i}.mlp", f"layers.{i}.ffn"
        d_ff_expert = cfg.moe.d_ff_expert or cfg.model.d_ff
        return [same(f"{sl}.router.weight", f"{hf_prefix}.gate.weight")] + expert_import(
            f"{hf_prefix}.experts", f"{sl}.experts", cfg.moe.num_experts, d_ff_expert, keys
        )

    def import_targets(self, cfg: Config, hf: dict, keys: set[str]) -> list[Target]:
        m = cfg.model
        targets = backbone_import(cfg, head_layout(hf, m.d_model, m.n_heads), keys)
        moe_layers = set(cfg.moe.layer_indices(m.n_layers))
        for i in range(m.n_layers):
            if i in moe_layers:
                targets += self.moe_layer_import(cfg, i, hf, keys)
            else:
                targets += dense_ffn_import(f"model.layers.{i}.mlp", f"layers.{i}.ffn", m.d_model, m.d_ff, False, keys)
        return targets


class Qwen3Moe(QwenMoE):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    qk_norm = True

    def check_export(self, cfg: Config) -> None:
        super().check_export(cfg)
        if not cfg.model.qk_norm:
            refuse("model.qk_norm=false (Qwen3-MoE normalises every head's queries and keys)")
        if cfg.moe.shared_expert:
            refuse("moe.shared_expert=true (Qwen3-MoE has no shared expert)")

    def hf_config(self, cfg: Config) -> dict:
        return {**super().hf_config(cfg), "attention_bias": False}

    def import_config(self, hf: dict) -> Config:
        if hf.get("attention_bias", False):
            refuse("attention_bias=true with bias-free MLPs (sparselm's model.bias covers every projection)")
        return super().import_config(hf)
