"""GGUF export for llama.cpp (dense and Mixtral-shaped): metadata, vocabulary and every tensor read back with the
gguf package's own reader; where llama-cpp-python is installed, llama.cpp itself tokenises like sparselm and
computes the same logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from interop_models import random_model, tiny_config, write_checkpoint
from sparselm.cli import main
from sparselm.data.tokenizer import Tokenizer
from sparselm.interop.gguf_export import export_gguf, gguf_targets, rotate_half_to_pairs

gguf = pytest.importorskip("gguf")
MIXTRAL = {"num_experts": 4, "top_k": 2, "moe_every": 1}


def field(reader, key: str):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


@pytest.mark.parametrize("moe", [{}, MIXTRAL], ids=["dense", "mixtral"])
def test_gguf_metadata_vocabulary_and_tensors(moe: dict, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_tokenizer.vocab_size + 5, {"tie_embeddings": not moe}, moe)  # 5 padding pieces
    model = random_model(cfg)
    ckpt = write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "ckpt")
    result = export_gguf(ckpt, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(result.path)

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 4 and field(reader, "llama.embedding_length") == 32
    assert field(reader, "llama.attention.head_count_kv") == 4 and field(reader, "llama.rope.dimension_count") == 8
    assert field(reader, "llama.vocab_size") == cfg.model.vocab_size
    if moe:
        assert (field(reader, "llama.expert_count"), field(reader, "llama.expert_used_count")) == (4, 2)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert (
        field(reader, "tokenizer.ggml.add_space_prefix") is False
        and field(reader, "tokenizer.ggml.add_bos_token") is False
    )
    assert field(reader, "tokenizer.ggml.eos_token_id") == tiny_tokenizer.eod_id
    tokens = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert len(pieces) == cfg.model.vocab_size
    assert pieces[: tiny_tokenizer.vocab_size] == [
        tiny_tokenizer.id_to_piece(i) for i in range(tiny_tokenizer.vocab_size)
    ]
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert kinds[:4] == [2, 3, 3, 6] and kinds[-1] == 5  # unknown, control x2, first byte piece ... padding unused

    state = model.state_dict()
    written = {t.name: t for t in reader.tensors}
    assert set(written) == {t.name for t in gguf_targets(cfg)}
    assert ("output.weight" in written) == bool(moe)  # tied embeddings: llama.cpp reuses token_embd
    heads = cfg.model.n_heads
    q = torch.from_numpy(np.array(written["blk.1.attn_q.weight"].data))
    assert torch.equal(q, rotate_half_to_pairs(state["layers.1.attn.q_proj.weight"], heads))
    assert not torch.equal(q, state["layers.1.attn.q_proj.weight"])
    if moe:
        gate = torch.from_numpy(np.array(written["blk.2.ffn_gate_exps.weight"].data))
        assert torch.equal(gate, state["layers.2.ffn.experts.w_gate"].transpose(1, 2))
        down = torch.from_numpy(np.array(written["blk.2.ffn_down_exps.weight"].data))
        assert torch.equal(down, state["layers.2.ffn.experts.w_down"].transpose(1, 2))
        assert torch.equal(
            torch.from_numpy(np.array(written["blk.2.ffn_gate_inp.weight"].data)), state["layers.2.ffn.router.weight"]
        )


def test_rotate_half_to_pairs_matches_interleaved_rope() -> None:
    """Adjacent-pair RoPE (llama.cpp's) on the permuted projection gives the rotate-half result (sparselm's and
    transformers'), its dimensions in the same permuted order on q and on k, so every q.k score is unchanged."""
    from sparselm.model.layers import apply_rope, rope_cos_sin

    hd, heads, steps = 8, 2, 5
    w, x = torch.randn(heads * hd, 16), torch.randn(steps, 16)
    cos, sin = rope_cos_sin(torch.arange(steps).unsqueeze(0), hd, 10000.0)  # [1, 1, T, hd/2]
    q = (x @ w.t()).unflatten(-1, (heads, hd)).transpose(0, 1)  # [H, T, hd]
    half = apply_rope(q.unsqueeze(0), cos, sin)[0]
    for weight, expect_equal in ((rotate_half_to_pairs(w, heads), True), (w, False)):
        p = (x @ weight.t()).unflatten(-1, (heads, hd)).transpose(0, 1).unflatten(-1, (hd // 2, 2))
        c, s = cos[0, 0], sin[0, 0]
        pairs = torch.stack((p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c), dim=-1).flatten(-2)
        in_pair_order = half.unflatten(-1, (2, hd // 2)).transpose(-1, -2).flatten(-2)
        assert torch.allclose(pairs, in_pair_order, atol=1e-6) == expect_equal


def test_gguf_bf16(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_tokenizer.vocab_size, moe=MIXTRAL)
    model = random_model(cfg)
    ckpt = write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "ckpt")
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", dtype="bfloat16").path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_v.weight"] == "BF16" and kinds["blk.0.attn_norm.weight"] == "F32"
    v = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    bits = torch.from_numpy(np.array(v.data).view(np.int16)).view(torch.bfloat16).reshape(32, 32)
    assert torch.equal(bits, model.state_dict()["layers.0.attn.v_proj.weight"].bfloat16())


@pytest.mark.parametrize(
    ("model", "moe", "message"),
    [
        ({}, {"num_experts": 4, "top_k": 1, "moe_every": 2}, "this model is a Qwen2MoeForCausalLM"),
        ({"bias": True}, {}, "model.bias=true"),
        ({"position": "absolute", "norm": "layernorm", "ffn": "gelu"}, {}, "GPT2LMHeadModel"),
    ],
)
def test_gguf_refusals(model: dict, moe: dict, message: str, tiny_tokenizer: Tokenizer, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(tiny_tokenizer.vocab_size, model, moe)
    ckpt = write_checkpoint(random_model(cfg), cfg, tiny_tokenizer.path, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("moe", [{}, MIXTRAL], ids=["dense", "mixtral"])
def test_llama_cpp_runs_the_export(moe: dict, tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """llama.cpp itself (llama-cpp-python, built from source; not a dependency): same ids, same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cfg = tiny_config(tiny_tokenizer.vocab_size, {}, moe)
    model = random_model(cfg)
    ckpt = write_checkpoint(model, cfg, tiny_tokenizer.path, tmp_path / "ckpt")
    path = export_gguf(ckpt, tmp_path / "m.gguf").path
    # An fp32 KV cache (llama.cpp's default is f16, which alone moves the logits by ~1e-3).
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False, type_k=f32, type_v=f32)
    text = "It was the best of times, ünïcödé 😀 and 1234."
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids == tiny_tokenizer.encode(text)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
