"""Tiny random models for the Hugging Face interop tests (no network, no hub): sparselm configs of every mapping,
parameters drawn so that nothing is at its neutral init (norm weights != 1, biases != 0, decisive routers)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparselm.checkpoint.files import save_checkpoint
from sparselm.config import Config, DataConfig, ModelConfig, MoEConfig, validate
from sparselm.model.transformer import Transformer
from sparselm.parallel.runtime import Runtime

DENSE_GPT2 = {"position": "absolute", "norm": "layernorm", "ffn": "gelu"}
# name -> (model fields, moe fields, the architecture export must choose)
CASES: dict[str, tuple[dict, dict, str]] = {
    "llama": ({}, {}, "LlamaForCausalLM"),
    "llama-bias-untied": ({"bias": True, "tie_embeddings": False}, {}, "LlamaForCausalLM"),
    "mixtral": ({}, {"num_experts": 4, "top_k": 2, "moe_every": 1}, "MixtralForCausalLM"),
    "qwen3-switch-top1": ({"qk_norm": True}, {"num_experts": 4, "top_k": 1, "moe_every": 2}, "Qwen3MoeForCausalLM"),
    "qwen3-top2-renorm": (
        {"qk_norm": True, "tie_embeddings": False},
        {"num_experts": 4, "top_k": 2, "moe_every": 1, "d_ff_expert": 24},
        "Qwen3MoeForCausalLM",
    ),
    "qwen2-shared-top1": (
        {},
        {"num_experts": 4, "top_k": 1, "moe_every": 2, "shared_expert": True},
        "Qwen2MoeForCausalLM",
    ),
    "qwen2-glam-every-other": (
        {},
        {"num_experts": 8, "top_k": 2, "moe_every": 2, "d_ff_expert": 24},
        "Qwen2MoeForCausalLM",
    ),
    "qwen2-no-renorm-top2": (
        {},
        {"num_experts": 4, "top_k": 2, "moe_every": 1, "renormalize": False},
        "Qwen2MoeForCausalLM",
    ),
    "gpt2": ({**DENSE_GPT2, "bias": True}, {}, "GPT2LMHeadModel"),
    "gpt2-no-bias-untied": ({**DENSE_GPT2, "tie_embeddings": False}, {}, "GPT2LMHeadModel"),
}


def tiny_config(vocab_size: int, model: dict | None = None, moe: dict | None = None) -> Config:
    fields = {"vocab_size": vocab_size, "d_model": 32, "n_layers": 4, "n_heads": 4, "d_ff": 48, "max_seq_len": 64}
    cfg = Config(
        model=ModelConfig(**{**fields, **(model or {})}), moe=MoEConfig(**(moe or {})), data=DataConfig(seq_len=64)
    )
    validate(cfg)
    return cfg


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter: norms around 1, biases around 0 but not 0, routers wide enough to route decisively."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.ndim == 1 and ("norm" in name or "ln_" in name or name.endswith("layernorm.weight")):
            p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif "router" in name or name.endswith("mlp.gate.weight") or "block_sparse_moe.gate" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(0.08 * noise)
    return module


def random_model(cfg: Config, seed: int = 0) -> Transformer:
    return randomize_(Transformer(cfg.model, cfg.moe), seed).eval()


def write_checkpoint(model: Transformer, cfg: Config, tokenizer_model: Path, run: Path, step: int = 7) -> Path:
    """A weights-only checkpoint as training writes one: RUN/checkpoints/step_..., returned."""
    return save_checkpoint(run, step, model, cfg, Runtime(cfg, torch.device("cpu")), tokenizer_path=tokenizer_model)


def sparselm_greedy(model: Transformer, prompt: list[int], new_tokens: int = 32) -> list[int]:
    from sparselm.model.generate import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True, stop_on_eod=False)
    return generate(model, [prompt], sampling)[0]


def hf_greedy(hf, prompt: list[int], new_tokens: int = 32) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def sparselm_routes(model: Transformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Top-k expert ids [tokens, k] chosen in every MoE layer, recorded by forward hooks on the routers."""
    routes: list[torch.Tensor] = []
    hooks = [
        block.ffn.router.register_forward_hook(lambda _m, _i, out: routes.append(out.experts))
        for block in model.layers
        if hasattr(block.ffn, "router")
    ]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return routes


def hf_routes(hf, idx: torch.Tensor) -> list[torch.Tensor]:
    """The same from a transformers MoE model: each router (``mlp.gate``) returns (logits, weights, indices)."""
    routes: list[torch.Tensor] = []
    layers = hf.model.layers if hasattr(hf, "model") else []  # GPT-2 (transformer.h) is dense
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _i, out: routes.append(out[2]))
        for layer in layers
        if hasattr(layer.mlp, "experts")
    ]
    with torch.no_grad():
        hf(idx)
    for h in hooks:
        h.remove()
    return routes
