"""Load a trained checkpoint (weights, config, tokenizer) for generation and evaluation."""

from __future__ import annotations

from pathlib import Path

from sparselm.checkpoint.files import load_config_from_checkpoint, load_model_weights, resolve_checkpoint
from sparselm.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, TextTokenizer, load_tokenizer
from sparselm.errors import CheckpointError
from sparselm.model.transformer import Transformer


def load_checkpoint(path: str | Path) -> tuple[Transformer, object, TextTokenizer]:
    """``path`` is a checkpoint directory or a run directory (its latest checkpoint). Returns (model, config,
    tokenizer) with the model in eval mode. The tokenizer is the checkpoint's SentencePiece ``tokenizer.model``
    (what sparselm trains) or, for an imported model, its Hugging Face ``tokenizer.json``."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config_from_checkpoint(ckpt)
    model = Transformer(cfg.model, cfg.moe, cfg.retro)
    load_model_weights(model, ckpt)
    model.eval()
    if not (ckpt / SENTENCEPIECE_FILE).is_file() and not (ckpt / HF_TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt} has no {SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE}")
    return model, cfg, load_tokenizer(ckpt)
