"""The experiment's dataset: raw text -> documents -> SentencePiece tokenizer -> token shards, cached in OUT/data.

Documents are extracted with the data pipeline's readers (a WikiExtractor ``<doc>`` block is one document, a
Project Gutenberg book loses its licence header and footer), so ``prepare`` holds validation text out by document:
no article or book is split between the training and the validation split.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sparselm.errors import InputError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst")


def find_text_files(inputs: list[Path]) -> list[Path]:
    """Text and JSONL files under ``inputs`` (files or directories), sorted; README/manifest files are skipped."""
    files: list[Path] = []
    for item in inputs:
        if not item.exists():
            raise FileNotFoundError(f"--data: {item} does not exist")
        if item.is_file():
            files.append(item)
            continue
        for path in sorted(item.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(item).parts)
            if path.is_file() and not hidden and path.name.lower().endswith(TEXT_SUFFIXES):
                files.append(path)
    if not files:
        raise FileNotFoundError(f"--data: no .txt or .jsonl files under {', '.join(map(str, inputs))}")
    return files


def extract_documents(files: list[Path], out: Path, progress: bool = True, max_chars: int = 0) -> dict[str, Any]:
    """Write every document of ``files`` to ``out`` (JSONL.gz, one ``{"text", "source"}`` per line), atomically.

    ``max_chars`` > 0 stops after that many characters, taking files in an order spread over the inputs' folders.
    """
    from sparselm.pipeline.sources import ReadOptions, iter_records

    options = ReadOptions(invalid_utf8="replace")
    counts: dict[str, int] = {"files": len(files), "documents": 0, "characters": 0, "rejected": 0}
    tmp = out.with_name(out.name + ".tmp")
    if max_chars:
        files = _interleave_folders(files)
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for path in tqdm(files, desc="extract", unit="file", disable=not progress, dynamic_ncols=True):
            if max_chars and counts["characters"] >= max_chars:
                break
            for record in iter_records(path, options):
                if record.reason or not record.text or not record.text.strip():
                    counts["rejected"] += 1
                    continue
                f.write(json.dumps({"text": record.text, "source": record.location}) + "\n")
                counts["documents"] += 1
                counts["characters"] += len(record.text)
    tmp.replace(out)
    return counts


def _interleave_folders(files: list[Path]) -> list[Path]:
    """Round-robin over parent folders, so a truncated read still samples books, articles and speeches alike."""
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    order: list[Path] = []
    while any(groups.values()):
        for folder in list(groups):
            if groups[folder]:
                order.append(groups[folder].pop(0))
    return order


def prepare_dataset(
    inputs: list[Path],
    out_dir: Path,
    vocab_size: int,
    val_fraction: float,
    seed: int,
    progress: bool = True,
    max_chars: int = 0,
) -> Path:
    """Build (or reuse) ``out_dir`` holding documents.jsonl.gz, tokenizer.model and the token shards.

    A finished dataset is recognised by its ``meta.json`` and reused only if it was built from the same inputs and
    settings; otherwise it is an error rather than a silent mix of two datasets.
    """
    from sparselm.data.prepare import prepare
    from sparselm.data.tokenizer import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    files = find_text_files(inputs)
    recipe = {
        "inputs": [str(p.resolve()) for p in inputs],
        "files": len(files),
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_chars": max_chars,
    }
    recipe_path = out_dir / "recipe.json"
    shards = out_dir / "shards"
    if (shards / "meta.json").is_file() and recipe_path.is_file():
        built = json.loads(recipe_path.read_text())
        if built != recipe:
            raise InputError(
                f"{out_dir} holds a dataset built with different settings ({built}); use another --out or delete it"
            )
        return shards
    documents = out_dir / "documents.jsonl.gz"
    counts = extract_documents(files, documents, progress, max_chars)
    tokenizer = train_tokenizer([documents], out_dir / "tokenizer", vocab_size=vocab_size, seed=seed)
    prepare([documents], tokenizer, shards, val_fraction=val_fraction, seed=seed, progress=progress, overwrite=True)
    recipe_path.write_text(json.dumps(recipe, indent=1))
    (out_dir / "extract.json").write_text(json.dumps(counts, indent=1))
    return shards
