"""MoE every k-th layer, with or without renormalised gates, with or without a shared expert
<-> ``Qwen2MoeForCausalLM``.

Qwen2-MoE adds a shared expert to every MoE layer, scaled by a learned gate: ``sigmoid(x w_g) * shared(x)``.
sparselm's shared expert (DeepSpeed-MoE's Residual-MoE) is added unscaled. The exact mapping: a zero gate weight
makes the scale sigmoid(0) = 0.5 for every token, and a doubled down projection restores the sum. Both are powers
of two, so the HF model computes bit for bit the same products (tests/test_interop_parity.py checks it). A
checkpoint whose gate weights were trained (not all zero) would need a gated shared expert in sparselm: refused.

Models without a shared expert export with ``shared_expert_intermediate_size = 0`` (how vLLM and transformers
read "no shared expert": the shared branch is zero-width and adds nothing). Qwen2-MoE has no query/key norm, so
every sparselm MoE with ``model.qk_norm = false`` that Mixtral cannot hold comes here. Its q/k/v projections carry
biases in every reader before transformers 5 made them optional (``qkv_bias``), so they are written as zeros with
``qkv_bias = true``; import accepts q/k/v biases that are all zero and refuses trained ones.
"""

from __future__ import annotations

import torch

from sparselm.config import Config
from sparselm.errors import InputError
from sparselm.interop.mapping import FILE, Target, refuse, same, zeros
from sparselm.interop.qwen3_moe import QwenMoE


def _with_zero_bias(target: Target, bias_name: str):
    """``target``'s builder, after checking that the q/k/v bias (its last source) is exactly zero."""

    def build(*tensors: torch.Tensor) -> torch.Tensor:
        bias = tensors[-1]
        if bias.device.type != "meta" and bool(bias.any()):
            raise InputError(
                f"{bias_name} is not zero: trained q/k/v biases without an output-projection bias have no sparselm "
                "equivalent (model.bias covers every projection)"
            )
        return target.build(*tensors[:-1])

    return build


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
        return {**super().hf_config(cfg), "shared_expert_intermediate_size": width, "qkv_bias": True}

    def export_targets(self, cfg: Config, layout: str = FILE) -> list[Target]:
        d = cfg.model.d_model
        zero_biases = [
            zeros(f"model.layers.{i}.self_attn.{p}_proj.bias", (d,)) for i in range(cfg.model.n_layers) for p in "qkv"
        ]
        return super().export_targets(cfg, layout) + zero_biases

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

    def import_targets(self, cfg: Config, hf: dict, keys: set[str]) -> list[Target]:
        targets = super().import_targets(cfg, hf, keys)
        if not hf.get("qkv_bias", True):  # transformers 4's Qwen2-MoE always has them (the field did not exist)
            return targets
        for i, t in enumerate(targets):
            layer, _, rest = t.name.removeprefix("layers.").partition(".attn.")
            if rest in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
                bias = f"model.layers.{layer}.self_attn.{rest.replace('weight', 'bias')}"
                targets[i] = Target(t.name, (*t.sources, bias), _with_zero_bias(t, bias))
        return targets

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
