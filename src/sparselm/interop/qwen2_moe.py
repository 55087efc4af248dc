"""MoE every k-th layer, with or without renormalised gates, with or without a shared expert
<-> ``Qwen2MoeForCausalLM``.

Qwen2-MoE adds a shared expert to every MoE layer, scaled by a learned gate: ``sigmoid(x w_g) * shared(x)``.
sparselm's shared expert (DeepSpeed-MoE's Residual-MoE) is added unscaled. The exact mapping: a zero gate weight
makes the scale sigmoid(0) = 0.5 for every token, and a doubled down projection restores the sum. Both are powers
of two, so the HF model computes bit for bit the same products (tests/test_interop_parity.py checks it). A
checkpoint whose gate weights were trained (not all zero) would need a gated shared expert in sparselm: refused.

Models without a shared expert export with ``shared_expert_intermediate_size = 0`` (how vLLM and transformers
read "no shared expert": the shared branch is zero-width and adds nothing). Qwen2-MoE has no query/key norm, so
every sparselm MoE with ``model.qk_norm = false`` that Mixtral cannot hold comes here.
"""

from __future__ import annotations

import torch

from sparselm.config import Config
from sparselm.errors import InputError
from sparselm.interop.mapping import Target, refuse, same, zeros
from sparselm.interop.qwen3_moe import QwenMoE


def _halve_if_ungated(layer: int):
    def build(down: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if gate.device.type != "meta" and bool(gate.any()):
            raise InputError(
                f"layer {layer}: mlp.shared_expert_gate.weight is not zero (a trained shared-expert gate); sparselm's "
                "shared expert has no gate, so this checkpoint has no exact sparselm equivalent"
            )
        return down / 2  # sigmoid(0) = 0.5 times the checkpoint's projection

    return build


class Qwen2Moe(QwenMoE):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    model_type = "qwen2_moe"

    def check_export(self, cfg: Config) -> None:
        super().check_export(cfg)
        if cfg.model.qk_norm:
            refuse("model.qk_norm=true (Qwen2-MoE has no query/key norm)")

    def hf_config(self, cfg: Config) -> dict:
        e = cfg.moe
        width = (e.d_ff_expert or cfg.model.d_ff) if e.shared_expert else 0
        return {**super().hf_config(cfg), "shared_expert_intermediate_size": width, "qkv_bias": False}

    def moe_layer_export(self, cfg: Config, i: int, layout: str) -> list[Target]:
        hf, sl = f"model.layers.{i}.mlp", f"layers.{i}.ffn"
        d = cfg.model.d_model
        targets = super().moe_layer_export(cfg, i, layout)
        targets.append(zeros(f"{hf}.shared_expert_gate.weight", (1, d)))
        shared = f"{hf}.shared_expert"
        if cfg.moe.shared_expert:
            targets.append(same(f"{shared}.gate_proj.weight", f"{sl}.shared.gate.weight"))
            targets.append(same(f"{shared}.up_proj.weight", f"{sl}.shared.up.weight"))
            targets.append(Target(f"{shared}.down_proj.weight", (f"{sl}.shared.down.weight",), lambda w: w * 2))
        else:  # zero-width: the tensors transformers expects, holding nothing (same names in files and memory)
            targets += [zeros(f"{shared}.{p}_proj.weight", (0, d)) for p in ("gate", "up")]
            targets.append(zeros(f"{shared}.down_proj.weight", (d, 0)))
        return targets

    def import_config(self, hf: dict) -> Config:
        if hf.get("qkv_bias", True):
            refuse("qkv_bias=true (biases on q/k/v only; sparselm's model.bias covers every projection)")
        cfg = super().import_config(hf)
        width = hf.get("shared_expert_intermediate_size") or 0
        if cfg.moe.enabled and width:
            expert_width = cfg.moe.d_ff_expert or cfg.model.d_ff
            if width != expert_width:
                refuse(
                    f"shared_expert_intermediate_size={width} differs from moe_intermediate_size={expert_width} "
                    "(sparselm's shared expert is as wide as a routed expert)"
                )
            cfg.moe.shared_expert = True
        return cfg

    def moe_layer_import(self, cfg: Config, i: int, hf: dict, keys: set[str]) -> list[Target]:
        targets = super().moe_layer_import(cfg, i, hf, keys)
        if cfg.moe.shared_expert:
            shared, sl = f"model.layers.{i}.mlp.shared_expert", f"layers.{i}.ffn.shared"
            targets.append(same(f"{sl}.gate.weight", f"{shared}.gate_proj.weight"))
            targets.append(same(f"{sl}.up.weight", f"{shared}.up_proj.weight"))
            gate = f"model.layers.{i}.mlp.shared_expert_gate.weight"
            targets.append(Target(f"{sl}.down.weight", (f"{shared}.down_proj.weight", gate), _halve_if_ungated(i)))
        return targets

    def ignored(self, cfg: Config, hf: dict, keys: set[str]) -> set[str]:
        if cfg.moe.shared_expert:
            return set()
        return {k for k in keys if ".mlp.shared_expert." in k or k.endswith(".mlp.shared_expert_gate.weight")}
