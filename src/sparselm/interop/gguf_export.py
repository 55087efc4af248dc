"""``sparselm export --format gguf``: one llama.cpp file for dense (Llama-shaped) and Mixtral-shaped models.

llama.cpp's ``llama`` architecture covers both (with ``expert_count`` it is Mixtral: softmax router, top-k gates
renormalised), with the SentencePiece vocabulary, scores and piece types (``tokenizer.ggml.model = llama``), no
space prefix and no automatic BOS, as sparselm tokenises. Two layout facts matter:

- llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... where sparselm and transformers rotate halves
  (x_i, x_{i + hd/2}); the q and k rows of each head are therefore reordered (first half and second half
  interleaved), the permutation llama.cpp's own converter applies to transformers checkpoints.
- tensors are written as numpy arrays in their PyTorch shapes (ggml reads the dimensions in reverse): experts
  as [E, f, d] for gate/up and [E, d, f] for down, as transformers' per-expert weights stacked.

Tensors are converted and written one at a time (a sharded checkpoint never sits in memory whole); 1-D tensors
(norms) and the router stay fp32 whatever ``dtype`` says, as llama.cpp's converter does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparselm.checkpoint.files import load_config_from_checkpoint, resolve_checkpoint
from sparselm.config import Config
from sparselm.errors import InputError
from sparselm.interop.architectures import choose_mapping
from sparselm.interop.convert import build, missing_sources, open_sparselm_checkpoint, output_meta
from sparselm.interop.mapping import Refusal, Target, same

GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class GGUFResult:
    path: Path
    arch: str
    bytes: int


def rotate_half_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection [heads * hd, d] reordered so llama.cpp's adjacent-pair RoPE computes what
    rotate-half RoPE computes on the original: row j of the first half goes to 2j, row j of the second to 2j + 1."""
    return weight.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def gguf_targets(cfg: Config) -> list[Target]:
    m = cfg.model
    moe_layers = set(cfg.moe.layer_indices(m.n_layers))
    targets = [same("token_embd.weight", "tok_emb.weight")]
    for i in range(m.n_layers):
        blk, sl = f"blk.{i}", f"layers.{i}"
        targets += [
            same(f"{blk}.attn_norm.weight", f"{sl}.attn_norm.weight"),
            Target(f"{blk}.attn_q.weight", (f"{sl}.attn.q_proj.weight",), lambda w: rotate_half_to_pairs(w, m.n_heads)),
            Target(f"{blk}.attn_k.weight", (f"{sl}.attn.k_proj.weight",), lambda w: rotate_half_to_pairs(w, m.n_heads)),
            same(f"{blk}.attn_v.weight", f"{sl}.attn.v_proj.weight"),
            same(f"{blk}.attn_output.weight", f"{sl}.attn.o_proj.weight"),
            same(f"{blk}.ffn_norm.weight", f"{sl}.ffn_norm.weight"),
        ]
        if i in moe_layers:
            experts = f"{sl}.ffn.experts"
            targets += [
                same(f"{blk}.ffn_gate_inp.weight", f"{sl}.ffn.router.weight"),
                Target(f"{blk}.ffn_gate_exps.weight", (f"{experts}.w_gate",), lambda w: w.transpose(1, 2)),
                Target(f"{blk}.ffn_up_exps.weight", (f"{experts}.w_up",), lambda w: w.transpose(1, 2)),
                Target(f"{blk}.ffn_down_exps.weight", (f"{experts}.w_down",), lambda w: w.transpose(1, 2)),
            ]
        else:
            targets += [same(f"{blk}.ffn_{p}.weight", f"{sl}.ffn.{p}.weight") for p in ("gate", "up", "down")]
    targets.append(same("output_norm.weight", "norm.weight"))
    if not m.tie_embeddings:  # llama.cpp falls back to token_embd when output.weight is absent: tied
        targets.append(same("output.weight", "lm_head.weight"))
    return targets


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of the SentencePiece model, padded with unused pieces to the model's vocab_size."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tokenizer.path))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(5)
    return pieces, scores, types


def _ggml_type(tensor: torch.Tensor, kind: str) -> str:
    return "F32" if tensor.ndim == 1 else kind  # norms stay fp32, as llama.cpp's converter keeps them


def _as_numpy(tensor: torch.Tensor, kind: str):
    """The array written for one tensor in ggml type ``kind`` (F32, F16 or BF16)."""
    if kind == "F32":
        return tensor.float().numpy()
    if kind == "F16":
        return tensor.half().numpy()
    return tensor.bfloat16().view(torch.int16).numpy()  # numpy has no bf16: its bits as int16


def export_gguf(
    ckpt: str | Path, out: str | Path, architecture: str | None = None, dtype: str = "float32", overwrite: bool = False
) -> GGUFResult:
    import gguf

    from sparselm.data.tokenizer import Tokenizer, load_tokenizer

    if dtype not in GGUF_TYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose a new file (or pass --overwrite)")
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_config_from_checkpoint(ckpt)
    mapping = choose_mapping(cfg, architecture)
    if not mapping.gguf:
        raise Refusal(
            f"GGUF export writes llama.cpp's llama architecture (dense Llama or Mixtral shapes); this model is a "
            f"{mapping.architecture}"
        )
    if cfg.model.bias:
        raise Refusal("GGUF export writes bias-free llama models; this one has model.bias=true")
    tokenizer = load_tokenizer(ckpt)
    if not isinstance(tokenizer, Tokenizer):
        raise Refusal("GGUF export needs a SentencePiece tokenizer.model (llama.cpp's llama vocabulary)")
    source = open_sparselm_checkpoint(ckpt)
    targets = gguf_targets(cfg)
    missing = missing_sources(targets, source)
    if missing:
        raise InputError(f"{ckpt}: the checkpoint has no tensor {missing[0]}")
    meta = output_meta(targets, source)

    m, e = cfg.model, cfg.moe
    kind = GGUF_TYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp_{out.name}_{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(f"sparselm {mapping.name}")
        writer.add_file_type(
            {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
                kind, gguf.LlamaFileType.MOSTLY_BF16
            )
        )
        writer.add_context_length(m.max_seq_len)
        writer.add_embedding_length(m.d_model)
        writer.add_block_count(m.n_layers)
        writer.add_feed_forward_length((e.d_ff_expert or m.d_ff) if e.enabled else m.d_ff)
        writer.add_head_count(m.n_heads)
        writer.add_head_count_kv(m.n_heads)
        writer.add_rope_dimension_count(m.d_model // m.n_heads)
        writer.add_rope_freq_base(m.rope_theta)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        writer.add_vocab_size(m.vocab_size)
        if e.enabled:
            writer.add_expert_count(e.num_experts)
            writer.add_expert_used_count(e.top_k)
        pieces, scores, types = _vocabulary(tokenizer, m.vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
            writer.add_bos_token_id(tokenizer.bos_id)
        writer.add_eos_token_id(tokenizer.eod_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
        total = 0
        for t in targets:  # declare every tensor first (shapes from meta tensors), then stream the data
            ggml = _ggml_type(meta[t.name], kind)
            example = _as_numpy(torch.empty(0), ggml)
            nbytes = meta[t.name].numel() * example.itemsize
            shape = tuple(meta[t.name].shape)
            writer.add_tensor_info(t.name, shape, example.dtype, nbytes, getattr(gguf.GGMLQuantizationType, ggml))
            total += nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in targets:
            tensor = build([t], source)[t.name]
            writer.write_tensor_data(_as_numpy(tensor, _ggml_type(tensor, kind)))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return GGUFResult(out, "llama", total)
