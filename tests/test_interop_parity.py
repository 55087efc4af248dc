"""Hugging Face interop, every mapping, both directions, on tiny random models built here (no hub):
fp32 logits within 1e-5, the same greedy 32-token continuation, the same router top-k in every MoE layer, and
export -> import bitwise equal. transformers' own model classes are the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interop_models import (
    CASES,
    hf_greedy,
    hf_routes,
    random_model,
    randomize_,
    sparselm_greedy,
    sparselm_routes,
    tiny_config,
    write_checkpoint,
)
from sparselm.checkpoint.inference import load_checkpoint
from sparselm.data.tokenizer import Tokenizer
from sparselm.interop import export_hf, import_hf, to_transformers  # the public names other components use
from sparselm.interop.tokenizer_files import write_tokenizer_files

transformers = pytest.importorskip("transformers")
# A Qwen2-MoE without a shared expert has a zero-width one, which torch warns it cannot initialise.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def batch(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def assert_same_model(ours, theirs, vocab: int) -> None:
    """The three parity checks: logits, greedy continuation, router choices."""
    idx = batch(vocab)
    with torch.no_grad():
        diff = (ours(idx).logits - theirs(idx).logits).abs().max().item()
    assert diff < TOLERANCE, f"logits differ by {diff}"
    prompt = idx[0, :8].tolist()
    assert sparselm_greedy(ours, prompt) == hf_greedy(theirs, prompt)
    routes, hf = sparselm_routes(ours, idx), hf_routes(theirs, idx)
    assert len(routes) == len(hf) == len(ours.moe_cfg.layer_indices(ours.cfg.n_layers))
    for layer, (a, b) in enumerate(zip(routes, hf, strict=True)):
        assert torch.equal(a, b), f"MoE layer {layer} routes differently"


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_then_import(case: str, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model_fields, moe_fields, architecture = CASES[case]
    cfg = tiny_config(tiny_tokenizer.vocab_size, model_fields, moe_fields)
    model = random_model(cfg)
    ckpt = write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "ckpt")

    result = export_hf(ckpt, tmp_path / "hf")
    assert result.architecture == architecture
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == architecture
    assert_same_model(model, hf, cfg.model.vocab_size)

    # In memory (the serving benchmark's baseline): the same model without files.
    assert_same_model(model, to_transformers(model, cfg), cfg.model.vocab_size)

    imported = import_hf(tmp_path / "hf", tmp_path / "run")
    back, back_cfg, tokenizer = load_checkpoint(imported.out)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "round trip is not bitwise"
    for field in ("n_layers", "d_model", "n_heads", "vocab_size", "tie_embeddings", "bias", "qk_norm", "position"):
        assert getattr(back_cfg.model, field) == getattr(cfg.model, field), field
    for field in ("num_experts", "top_k", "moe_every", "shared_expert"):
        assert getattr(back_cfg.moe, field) == getattr(cfg.moe, field), field
    if cfg.moe.top_k > 1:
        assert back_cfg.moe.renormalize == cfg.moe.renormalize
    assert tokenizer.encode("Round trip, ünïcödé 😀") == tiny_tokenizer.encode("Round trip, ünïcödé 😀")


def test_wrong_qk_permutation_fails_the_parity_check(tiny_tokenizer: Tokenizer) -> None:
    """sparselm and transformers both rotate halves: the q/k weights copy unpermuted. The permutation other
    converters apply (to llama.cpp's interleaved pairs) still runs, but the logits check catches it."""
    cfg = tiny_config(tiny_tokenizer.vocab_size)
    model = random_model(cfg)
    hf = to_transformers(model, cfg)
    heads, hd = cfg.model.n_heads, cfg.model.d_model // cfg.model.n_heads
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = proj.weight.unflatten(0, (heads, 2, hd // 2)).transpose(1, 2).flatten(0, 2)
                proj.weight.copy_(w)
        idx = batch(cfg.model.vocab_size)
        diff = (model(idx).logits - hf(idx).logits).abs().max().item()
    assert diff > 100 * TOLERANCE, f"a wrong q/k permutation went unnoticed (max logit difference {diff})"


def test_qwen2_shared_expert_gate_mapping_is_exact(tiny_tokenizer: Tokenizer) -> None:
    """sparselm's ungated shared expert = Qwen2-MoE's with a zero gate (sigmoid 0.5) and a doubled down
    projection: bitwise the same layer output, and without the doubling it is off by the shared expert's half."""
    cfg = tiny_config(
        tiny_tokenizer.vocab_size, moe={"num_experts": 4, "top_k": 2, "moe_every": 1, "shared_expert": True}
    )
    model = random_model(cfg)
    hf = to_transformers(model, cfg)
    x = torch.randn(2, 5, cfg.model.d_model, generator=torch.Generator().manual_seed(3))
    ours_ffn, hf_mlp = model.layers[0].ffn, hf.model.layers[0].mlp
    with torch.no_grad():
        assert torch.count_nonzero(hf_mlp.shared_expert_gate.weight) == 0
        assert torch.equal(hf_mlp.shared_expert.down_proj.weight, 2 * ours_ffn.shared.down.weight)
        shared_ours = ours_ffn.shared(x)
        shared_hf = torch.sigmoid(hf_mlp.shared_expert_gate(x)) * hf_mlp.shared_expert(x)
        assert torch.equal(shared_ours, shared_hf)
        assert (ours_ffn(x)[0] - hf_mlp(x)).abs().max() < TOLERANCE
        hf_mlp.shared_expert.down_proj.weight.copy_(ours_ffn.shared.down.weight)  # forget the doubling
        assert (ours_ffn(x)[0] - hf_mlp(x)).abs().max() > 100 * TOLERANCE


# ------------------------------------------------------------------------ transformers -> sparselm -> transformers

HF_CASES = {
    "llama-gqa": ("LlamaConfig", {"intermediate_size": 48, "num_key_value_heads": 2}),
    "llama-attention-bias": ("LlamaConfig", {"intermediate_size": 48, "attention_bias": True}),
    "mixtral-gqa": ("MixtralConfig", {"intermediate_size": 24, "num_local_experts": 4, "num_key_value_heads": 2}),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 2,
            "norm_topk_prob": False,
            "num_key_value_heads": 2,
        },
    ),
    "qwen3-moe-mlp-only": (
        "Qwen3MoeConfig",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_experts": 4,
            "num_experts_per_tok": 1,
            "mlp_only_layers": [0, 2],
        },
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "qkv_bias": False,
            "num_key_value_heads": 4,
        },
    ),
    "gpt2": ("GPT2Config", {"n_inner": 48}),
}


def random_hf_model(kind: str, vocab: int, fields: dict):
    common = {"vocab_size": vocab}
    if kind == "GPT2Config":
        common |= {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2}
    else:
        common |= {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    config = getattr(transformers, kind)(**common, **fields)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, seed=5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("shared_expert_gate.weight"):
                p.zero_()  # a trained gate has no sparselm equivalent (tested in test_interop_errors.py)
    return hf.eval()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_import_then_export(case: str, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    kind, fields = HF_CASES[case]
    hf = random_hf_model(kind, tiny_tokenizer.vocab_size, fields)
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes the hub's per-expert layout
    write_tokenizer_files(tiny_tokenizer, tmp_path / "hf", 64)

    imported = import_hf(tmp_path / "hf", tmp_path / "run")
    model, cfg, _ = load_checkpoint(imported.out)
    assert_same_model(model, hf, tiny_tokenizer.vocab_size)

    export_hf(imported.out, tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == type(hf).__name__
    assert_same_model(model, again, tiny_tokenizer.vocab_size)


@pytest.mark.parametrize("case", ["mixtral-gqa", "qwen2-moe"])
def test_import_reads_fused_expert_tensors(case: str, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2f, d], experts.down_proj [E, d, f]) written
    to disk as is imports to the same model as the per-expert files."""
    from safetensors.torch import save_file

    kind, fields = HF_CASES[case]
    hf = random_hf_model(kind, tiny_tokenizer.vocab_size, fields)
    folder = tmp_path / "fused"
    folder.mkdir()
    state = {
        k: v.contiguous()
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight" or not hf.config.tie_word_embeddings
    }
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf.config.architectures = [type(hf).__name__]
    hf.config.to_json_file(folder / "config.json")
    write_tokenizer_files(tiny_tokenizer, folder, 64)
    imported = import_hf(folder, tmp_path / "run")
    model, _, _ = load_checkpoint(imported.out)
    assert_same_model(model, hf, tiny_tokenizer.vocab_size)


def test_sharded_export_loads_in_transformers(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_tokenizer.vocab_size, moe={"num_experts": 4, "top_k": 2, "moe_every": 1})
    model = random_model(cfg)
    ckpt = write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "ckpt")
    result = export_hf(ckpt, tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert result.shards == len(files) > 3 and not (tmp_path / "hf" / "model.safetensors").exists()
    from safetensors import safe_open

    for name in files:  # every shard within the limit, unless it holds a single bigger tensor
        with safe_open(str(tmp_path / "hf" / name), "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]  # noqa: SIM118
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.state_dict().values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_same_model(model, hf, cfg.model.vocab_size)
    back, _, _ = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "run").out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))


def test_bf16_export_is_within_bf16_rounding(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_tokenizer.vocab_size)
    model = random_model(cfg)
    export_hf(write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "ckpt"), tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    back, _, _ = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "run").out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.to(torch.bfloat16).float()), name
