"""``sparselm import --hf DIR --out RUN``: a Hugging Face model directory -> a sparselm run directory.

``RUN/checkpoints/step_00000000/`` holds a weights-only checkpoint (``model.safetensors``, ``config.toml``,
``trainer_state.json``, tokenizer files) that ``eval``, ``generate``, ``ppl`` and ``train --resume`` accept, and
``RUN/config.toml`` the config to train from. Everything is checked before anything is written: the
architecture, every config field (one line naming the field sparselm cannot represent), every tensor (missing,
unexpected or of the wrong shape), and the tokenizer; RUN appears only once complete.

Weights are read from safetensors only (never unpickled), in either expert layout, cast to fp32 (sparselm's
master weights; bf16 and fp16 widen exactly).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sparselm.checkpoint.files import save_checkpoint, staged_directory
from sparselm.config import Config, to_toml, validate
from sparselm.data.hf_tokenizer import HFTokenizer, special_tokens
from sparselm.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, Tokenizer
from sparselm.errors import ConfigError, InputError
from sparselm.interop.architectures import mapping_for
from sparselm.interop.convert import RenamedSource, SafetensorsSource, build, missing_sources, output_meta
from sparselm.interop.mapping import Mapping, Refusal
from sparselm.model.transformer import Transformer
from sparselm.parallel.runtime import Runtime

IMPORTED_STEP_DIR = "step_00000000"  # what save_checkpoint names step 0
# Text on which a SentencePiece tokenizer.model must give the ids of the checkpoint's tokenizer.json to be kept.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  Two  spaces, a tab\tand\nnew lines\n\n",
    "Unicode: café, naïve, 漢字かな한국어, ∑∫≈, emoji 😀🚀👩\u200d💻, digits 1234567890.",
)


@dataclass
class ImportResult:
    out: Path
    checkpoint: Path
    architecture: str
    cfg: Config
    tokenizer: str  # which tokenizer sparselm will use: "tokenizer.model" (SentencePiece) or "tokenizer.json"


def read_hf_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory")
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} does not hold a JSON object")
    if config.get("quantization_config"):
        raise InputError(f"{path}: quantized checkpoints are not imported (quantization_config is set)")
    return config


def _canonical_names(mapping: Mapping, keys: set[str]) -> dict[str, str]:
    """The checkpoint's tensor names as the mapping expects them (a bare base model's lack its prefix)."""
    names = {}
    for key in keys:
        full = key if key.startswith(mapping.base_prefix) or key.startswith("lm_head.") else mapping.base_prefix + key
        names[full] = key
    return names


def _import_weights(mapping: Mapping, cfg: Config, hf: dict, folder: Path) -> dict[str, torch.Tensor]:
    raw = SafetensorsSource.hf_directory(folder)
    source = RenamedSource(raw, _canonical_names(mapping, raw.keys()))
    keys = source.keys()
    targets = mapping.import_targets(cfg, hf, keys)
    missing = missing_sources(targets, source)
    if missing:
        raise InputError(f"{folder}: missing tensor {missing[0]} (a {mapping.architecture} with this config has it)")
    used = {s for t in targets for s in t.sources}
    ignored = mapping.ignored(cfg, hf, keys) | ({"lm_head.weight"} if cfg.model.tie_embeddings else set())
    unexpected = sorted(keys - used - ignored)
    if unexpected:
        raise InputError(
            f"{folder}: unexpected tensor {unexpected[0]}: a sparselm model of this config has no place for it"
        )
    with torch.device("meta"):
        expected = Transformer(cfg.model, cfg.moe).state_dict()
    for name, meta in output_meta(targets, source).items():
        if meta.shape != expected[name].shape:
            sources = ", ".join(next(t for t in targets if t.name == name).sources) or "zeros"
            raise InputError(
                f"{folder}: mismatched shapes: {sources} gives {name} of shape {tuple(meta.shape)}, config.json "
                f"implies {tuple(expected[name].shape)}"
            )
    for name in keys & used:
        if not source.meta(name).dtype.is_floating_point:
            raise InputError(f"{folder}: tensor {name} has dtype {source.meta(name).dtype}, not a float")
    assert {t.name for t in targets} == set(expected), "import plan does not cover the model"  # a bug, not input
    # One target at a time: the checkpoint's tensors are read as needed, never all at once beside their copies.
    return {t.name: build([t], source, torch.float32)[t.name] for t in targets}


def _tokenizer_files(folder: Path, hf: dict, vocab_size: int, staging: Path) -> tuple[list[Path], str]:
    """Prepare the tokenizer files the checkpoint carries in ``staging``; returns (files, which sparselm uses)."""
    files: list[Path] = []
    hf_tokenizer = None
    if (folder / HF_TOKENIZER_FILE).is_file():
        shutil.copyfile(folder / HF_TOKENIZER_FILE, staging / HF_TOKENIZER_FILE)
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except ValueError as exc:
                raise InputError(f"{folder}/tokenizer_config.json is not valid JSON: {exc}") from None
        config.update(special_tokens(folder))
        if "eos_token" not in config:
            config["eos_token"] = _eos_from_model_config(folder, hf, staging / HF_TOKENIZER_FILE)
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        hf_tokenizer = HFTokenizer.load(staging / HF_TOKENIZER_FILE)
        files += [staging / HF_TOKENIZER_FILE, staging / "tokenizer_config.json"]
    sentencepiece = None
    if (folder / SENTENCEPIECE_FILE).is_file():
        try:
            sentencepiece = Tokenizer.load(folder / SENTENCEPIECE_FILE)
        except InputError:
            sentencepiece = None
    if sentencepiece is not None and (
        hf_tokenizer is None or all(sentencepiece.encode(t) == hf_tokenizer.encode(t) for t in PROBE_TEXTS)
    ):
        files.append(folder / SENTENCEPIECE_FILE)
        used, size = SENTENCEPIECE_FILE, sentencepiece.vocab_size
    elif hf_tokenizer is not None:
        used, size = HF_TOKENIZER_FILE, hf_tokenizer.vocab_size
    else:
        raise InputError(f"{folder} has no tokenizer sparselm can read ({HF_TOKENIZER_FILE} or {SENTENCEPIECE_FILE})")
    if size > vocab_size:
        raise InputError(f"{folder}: the tokenizer has {size} tokens, the model's vocab_size is only {vocab_size}")
    return files, used


def _eos_from_model_config(folder: Path, hf: dict, tokenizer_json: Path) -> str:
    from tokenizers import Tokenizer as RustTokenizer

    eos = hf.get("eos_token_id")
    generation = folder / "generation_config.json"
    if eos is None and generation.is_file():
        eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    token = RustTokenizer.from_file(str(tokenizer_json)).id_to_token(eos) if isinstance(eos, int) else None
    if token is None:
        raise InputError(f"{folder}: no end-of-sequence token in tokenizer_config.json or config.json")
    return token


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> ImportResult:
    """Import a Hugging Face model directory as a sparselm run directory (see the module docstring)."""
    folder = Path(hf_dir)
    hf = read_hf_config(folder)
    mapping = mapping_for(hf, str(folder))
    try:
        cfg = mapping.import_config(hf)
        cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
        validate(cfg)
    except Refusal as exc:
        raise Refusal(f"{folder}: cannot import this {mapping.architecture}: {exc}") from None
    except ConfigError as exc:
        raise InputError(f"{folder}: config.json gives an invalid sparselm config: {exc}") from None
    weights = _import_weights(mapping, cfg, hf, folder)
    mapping.simplify(cfg, weights)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    model.load_state_dict(weights, strict=True, assign=True)  # the imported tensors themselves, no copy
    with tempfile.TemporaryDirectory() as staging:
        tokenizer_files, used = _tokenizer_files(folder, hf, cfg.model.vocab_size, Path(staging))
        state = {"imported_from": str(folder.resolve()), "architecture": mapping.architecture}
        with staged_directory(out, overwrite) as tmp:
            # A weights-only checkpoint at step 0, written as training writes one: train --resume starts from it
            # with a fresh optimizer.
            save_checkpoint(tmp, 0, model, cfg, Runtime(cfg, torch.device("cpu")), None, None, state, tokenizer_files)
            (tmp / "config.toml").write_text(to_toml(cfg))
    out = Path(out)
    return ImportResult(out, out / "checkpoints" / IMPORTED_STEP_DIR, mapping.architecture, cfg, used)
