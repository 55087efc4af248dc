"""``sparselm export --format hf``: a checkpoint (single-process or sharded) -> a Hugging Face model directory.

The directory is what the hub holds: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json`` past ``max_shard_size``), the
tokenizer files and a ``README.md`` model card. Tensors are converted and written one output shard at a time,
reading only the source tensors that shard needs, so a sharded (DCP) checkpoint exports without ever holding the
whole model: peak memory is one output shard plus the source tensors it is built from. The directory appears
under its name only once complete.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sparselm.checkpoint.files import load_config_from_checkpoint, resolve_checkpoint, staged_directory
from sparselm.config import Config
from sparselm.errors import CheckpointError, InputError
from sparselm.interop.architectures import choose_mapping
from sparselm.interop.card import model_card
from sparselm.interop.convert import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorSource,
    build,
    missing_sources,
    nbytes,
    open_sparselm_checkpoint,
    output_meta,
    plan_shards,
)
from sparselm.interop.mapping import FILE, Mapping

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as transformers reads them, binary with 'iB')."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
        if not match:
            raise InputError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        size = int(number * base ** "_KMGT".index(unit[:1] or "_"))
    if size <= 0:
        raise InputError(f"--max-shard-size must be positive, got {text!r}")
    return size


@dataclass
class ExportResult:
    out: Path
    architecture: str
    shards: int
    total_bytes: int
    peak_loaded_bytes: int  # most source-tensor bytes held at once while converting


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:  # explicit: some config classes default to another vocabulary's ids (GPT-2: 50256)
        return {"bos_token_id": None, "eos_token_id": None}
    ids = {"eos_token_id": tokenizer.eod_id}
    if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        ids["bos_token_id"] = tokenizer.bos_id
    return ids


def hf_config_json(mapping: Mapping, cfg: Config, tokenizer, dtype: str) -> dict:
    return {
        "architectures": [mapping.architecture],
        "model_type": mapping.model_type,
        **mapping.hf_config(cfg),
        **_token_ids(tokenizer),
        "dtype": dtype,
        "torch_dtype": dtype,  # what transformers 4 and vLLM read (transformers 5 accepts it silently)
    }


def _check_source(cfg: Config, source: TensorSource, where: Path) -> None:
    """The checkpoint's tensors are exactly the model's (names and shapes), before anything is converted."""
    from sparselm.model.transformer import Transformer

    with torch.device("meta"):
        expected = Transformer(cfg.model, cfg.moe).state_dict()
    keys = source.keys()
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match config.toml (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        if source.meta(name).shape != tensor.shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(source.meta(name).shape)}, config.toml gives {tuple(tensor.shape)}"
            )


def write_hf_weights(
    mapping: Mapping, cfg: Config, source: TensorSource, out: Path, dtype: torch.dtype, max_bytes: int, progress: bool
) -> tuple[int, int]:
    """Convert and write the weights shard by shard into ``out``; returns (number of shards, total bytes)."""
    targets = mapping.export_targets(cfg, FILE)
    missing = missing_sources(targets, source)
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor {missing[0]}")
    meta = output_meta(targets, source)
    shards = plan_shards(targets, meta, dtype, max_bytes, source)
    total = sum(nbytes(meta[t.name], dtype) for t in targets)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for shard, name in tqdm(list(zip(shards, names, strict=True)), desc="export", unit="shard", disable=not progress):
        tensors = build(shard, source, dtype)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total


def export_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    architecture: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Export any sparselm checkpoint (or run directory: its latest checkpoint) as a Hugging Face model directory."""
    from sparselm.data.tokenizer import load_tokenizer
    from sparselm.interop.tokenizer_files import write_tokenizer_files

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_config_from_checkpoint(ckpt)
    mapping = choose_mapping(cfg, architecture)
    tokenizer = None
    with contextlib.suppress(FileNotFoundError):  # a checkpoint without a tokenizer exports without one
        tokenizer = load_tokenizer(ckpt)
    source = open_sparselm_checkpoint(ckpt)
    _check_source(cfg, source, ckpt)
    step = 0
    if (ckpt / "trainer_state.json").is_file():
        step = int(json.loads((ckpt / "trainer_state.json").read_text()).get("step", 0))
    with staged_directory(out_dir, overwrite) as tmp:
        shards, total = write_hf_weights(mapping, cfg, source, tmp, DTYPES[dtype], max_bytes, progress)
        config = hf_config_json(mapping, cfg, tokenizer, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {**_token_ids(tokenizer), "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        note = "no tokenizer in the checkpoint"
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, cfg.model.max_seq_len)
            note = "tokenizer.json" if tokenizer.path.suffix == ".json" else "SentencePiece with byte fallback"
        (tmp / "README.md").write_text(model_card(cfg, mapping.architecture, ckpt, step, note, dtype))
    return ExportResult(Path(out_dir), mapping.architecture, shards, total, source.peak_loaded_bytes)
