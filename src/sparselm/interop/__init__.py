"""Hugging Face and llama.cpp interop: exact conversions of sparselm checkpoints to and from Llama, Mixtral,
Qwen3-MoE, Qwen2-MoE and GPT-2 model directories, and to GGUF. See docs/interop.md.

One small module per architecture mapping (``llama``, ``mixtral``, ``qwen3_moe``, ``qwen2_moe``, ``gpt2``), each a
pair of per-tensor conversion plans (``mapping``) that ``convert`` runs against safetensors files, sharded
checkpoints or state dicts. The public functions import transformers and gguf only when called.
"""

from __future__ import annotations

from pathlib import Path


def export_hf(ckpt: str | Path, out_dir: str | Path, max_shard_size: str | int = "5GB", **options):
    """A sparselm checkpoint (or run directory) as a Hugging Face model directory; see ``hf_export.export_hf``."""
    from sparselm.interop.hf_export import export_hf as run

    return run(ckpt, out_dir, max_shard_size, **options)


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False):
    """A Hugging Face model directory as a sparselm run directory; see ``hf_import.import_hf``."""
    from sparselm.interop.hf_import import import_hf as run

    return run(hf_dir, out, overwrite)


def export_gguf(ckpt: str | Path, out: str | Path, **options):
    """A dense or Mixtral-shaped checkpoint as one llama.cpp GGUF file; see ``gguf_export.export_gguf``."""
    from sparselm.interop.gguf_export import export_gguf as run

    return run(ckpt, out, **options)


def to_transformers(model, cfg, architecture: str | None = None, tokenizer=None):
    """The equivalent ``transformers.PreTrainedModel`` of a sparselm model, in memory (same weights, eval mode)."""
    from sparselm.interop.in_memory import to_transformers as run

    return run(model, cfg, architecture, tokenizer)


__all__ = ["export_gguf", "export_hf", "import_hf", "to_transformers"]
