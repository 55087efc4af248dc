"""A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) behind sparselm's ``TextTokenizer`` interface.

This is the tokenizer an imported model brings along (``sparselm import``). Text is encoded without special tokens,
as sparselm encodes everywhere (documents are separated by the end-of-document id, never wrapped in BOS/EOS), and
decoded without dropping any. The end-of-document and BOS tokens come from ``tokenizer_config.json`` (or
``special_tokens_map.json``) beside the ``tokenizer.json``, as ``AutoTokenizer`` reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from sparselm.errors import InputError

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens(folder: Path) -> dict[str, str]:
    """``{"eos_token": ..., "bos_token": ..., "unk_token": ...}`` named by the tokenizer config files in ``folder``."""
    found: dict[str, str] = {}
    for name in reversed(CONFIG_FILES):  # tokenizer_config.json wins
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        for key in ("eos_token", "bos_token", "unk_token", "pad_token"):
            text = _token_text(data.get(key)) if isinstance(data, dict) else None
            if text is not None:
                found[key] = text
    return found


class HFTokenizer:
    """A loaded ``tokenizer.json``. Use ``HFTokenizer.load(path)``."""

    def __init__(self, tokenizer, path: Path, eod_id: int, bos_id: int | None) -> None:
        self._tok = tokenizer
        self._path = path
        self._eod_id = eod_id
        self._bos_id = bos_id

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for any parse error
            raise InputError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from None
        names = special_tokens(path.parent)
        eos = names.get("eos_token")
        eod_id = tok.token_to_id(eos) if eos is not None else None
        if eod_id is None:
            raise InputError(
                f"{path}: no end-of-sequence token (tokenizer_config.json beside it must name an eos_token "
                "that is in the vocabulary)"
            )
        bos = names.get("bos_token")
        return cls(tok, path, eod_id, tok.token_to_id(bos) if bos is not None else None)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self._eod_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise InputError(f"token id {token_id} is outside the vocabulary of {self._path}")
        return piece

    def __repr__(self) -> str:
        return f"HFTokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size})"
