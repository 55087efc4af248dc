"""Load a trained checkpoint (weights, config, tokenizer) for generation and evaluation."""

from __future__ import annotations

from pathlib import Path

from sparselm.checkpoint.files import load_config_from_checkpoint, load_model_weights, resolve_checkpoint
from sparselm.data.tokenizer import Tokenizer
from sparselm.errors import CheckpointError
from sparselm.model.transformer import Transformer


def load_checkpoint(path: str | Path) -> tuple[Transformer, object, Tokenizer]:
    """``path`` is a checkpoint directory or a run directory (its latest checkpoint). Returns (model, config,
    tokenizer) with the model in eval mode."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config_from_checkpoint(ckpt)
    model = Transformer(cfg.model, cfg.moe)
    load_model_weights(model, ckpt)
    model.eval()
    tok_path = ckpt / "tokenizer.model"
    if not tok_path.is_file():
        raise CheckpointError(f"{ckpt} has no tokenizer.model")
    return model, cfg, Tokenizer.load(tok_path)
