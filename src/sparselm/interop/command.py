"""Arguments of ``sparselm export`` and ``sparselm import`` (argparse only, so ``sparselm --help`` stays instant)."""

from __future__ import annotations

import argparse
import sys

ARCHITECTURES = ("llama", "mixtral", "qwen3_moe", "qwen2_moe", "gpt2")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory (any layout, sharded too)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--format",
        choices=("sparselm", "hf", "gguf"),
        default="sparselm",
        help="sparselm: one model.safetensors + config.toml + tokenizer (default); hf: a Hugging Face model "
        "directory; gguf: one llama.cpp file (dense and Mixtral-shaped models)",
    )
    p.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        help="force the Hugging Face architecture (default: the most specific one that holds the model exactly)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors shard, e.g. 500MB (default 5GB)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="hf and gguf: weight type (default float32, exact; bfloat16 halves the size)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="hf and gguf: replace --out if it exists (once the new one is complete)",
    )


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="a Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="run directory to create (checkpoints/step_00000000 + config.toml)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is complete)")


def run_export(args: argparse.Namespace) -> int:
    if args.format == "sparselm":
        from sparselm.checkpoint.files import export_checkpoint

        out = export_checkpoint(args.ckpt, args.out)  # replaces an earlier export, refuses anything else
        print(f"wrote {out / 'model.safetensors'} (with config.toml and the tokenizer: a checkpoint for one process)")
        return 0
    if args.format == "hf":
        from sparselm.interop.hf_export import export_hf

        result = export_hf(
            args.ckpt, args.out, args.max_shard_size, args.architecture, args.dtype, args.overwrite, progress=True
        )
        print(
            f"wrote {result.out}: {result.architecture}, {result.total_bytes / 1e6:,.1f} MB of weights in "
            f"{result.shards} shard(s)"
        )
        if not (result.out / "tokenizer.json").is_file():
            print("sparselm: warning: the checkpoint has no tokenizer; the export has none either", file=sys.stderr)
        return 0
    from sparselm.interop.gguf_export import export_gguf

    result = export_gguf(args.ckpt, args.out, args.architecture, args.dtype, args.overwrite)
    print(f"wrote {result.path}: llama.cpp '{result.arch}' architecture, {result.bytes / 1e6:,.1f} MB")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from sparselm.interop.hf_import import import_hf

    result = import_hf(args.hf, args.out, args.overwrite)
    m, e = result.cfg.model, result.cfg.moe
    shape = f"{m.n_layers} layers, d_model {m.d_model}"
    shape += f", {e.num_experts} experts top-{e.top_k}" if e.enabled else ""
    print(f"imported {result.architecture} ({shape}) into {result.checkpoint}; tokenizer: {result.tokenizer}")
    print(f"use it: sparselm generate --ckpt {result.out} --prompt ...; fine-tune: --config {result.out}/config.toml")
    return 0
