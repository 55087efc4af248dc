"""Tokenizers: the interface every part of sparselm uses, SentencePiece training and its loss-free wrapper.

Two implementations satisfy ``TextTokenizer``: ``Tokenizer`` (SentencePiece, what ``sparselm tokenizer train``
makes) and ``sparselm.data.hf_tokenizer.HFTokenizer`` (a Hugging Face ``tokenizer.json``, what an imported model
brings). ``load_tokenizer(path)`` picks the right one for a file or a checkpoint directory.

Choices that matter for the SentencePiece models sparselm trains:

Choices that matter for a language model:

- ``identity`` normalisation, no whitespace collapsing and no dummy prefix, so ``decode(encode(t)) == t`` for any
  text, including runs of spaces and newlines. Because nothing is added or removed at the edges, text can also be
  encoded in pieces and the ids concatenated, which is how long documents are handled.
- ``byte_fallback``: characters outside the vocabulary become their UTF-8 bytes instead of ``<unk>``. Newlines are
  never inside a training sentence (sentences are lines), so they always encode as the byte piece ``<0x0A>``.
- ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos, used as the end-of-document token); no padding piece.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

from sparselm.data.reader import ReadStats, iter_documents
from sparselm.errors import InputError

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
NUM_BYTE_PIECES = 256
MODEL_TYPES = ("bpe", "unigram")
# Texts longer than this are encoded in pieces: SentencePiece's memory grows with the length of one call.
ENCODE_CHUNK_CHARS = 1 << 16


def min_vocab_size(byte_fallback: bool = True) -> int:
    """Smallest vocab_size accepted: the special and byte pieces plus room for at least one character."""
    return NUM_SPECIAL + (NUM_BYTE_PIECES if byte_fallback else 0) + 1


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` into consecutive pieces of at most ``max_chars`` characters, joined back they give ``text``.

    Cuts go just before a space that follows a non-space, which is where SentencePiece starts a new word anyway,
    so encoding the pieces separately gives the same ids as encoding the whole text. Without such a space in the
    second half of the window, the cut goes after a newline, and failing that (e.g. 50 MB with no whitespace)
    exactly at ``max_chars``. Each step looks at one window only, so the total cost is linear in ``len(text)``.
    """
    if max_chars < 2:
        raise InputError(f"max_chars must be >= 2, got {max_chars}")
    start, n = 0, len(text)
    while n - start > max_chars:
        limit = start + max_chars
        lowest = start + max_chars // 2
        cut = _word_boundary(text, lowest, limit)
        if cut < 0:
            newline = text.rfind("\n", lowest, limit)
            cut = newline + 1 if newline >= 0 else limit
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _word_boundary(text: str, lowest: int, limit: int) -> int:
    """Position in (lowest, limit] of a space preceded by a non-space, or -1."""
    cut = text.rfind(" ", lowest + 1, limit + 1)
    tries = 0
    while cut > lowest and text[cut - 1].isspace() and tries < 32:  # step back over a run of spaces, boundedly
        cut = text.rfind(" ", lowest + 1, cut)
        tries += 1
    if cut <= lowest:
        return -1
    return cut  # after 32 tries inside a long run of spaces this may split the run; still loss-free


def iter_training_sentences(
    inputs: list[str | Path], max_sentence_chars: int, stats: ReadStats | None = None, text_field: str = "text"
) -> Iterator[str]:
    """The non-blank lines of every document, long lines split at word boundaries into bounded pieces."""
    for doc in iter_documents(inputs, text_field=text_field, stats=stats):
        for line in doc.text.split("\n"):
            if line and not line.isspace():
                yield from split_text(line, max_sentence_chars)


def train_tokenizer(
    inputs: list[str | Path],
    out_prefix: str | Path,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_chars: int = 4192,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 2,
    character_coverage: float = 0.9995,
    text_field: str = "text",
) -> Path:
    """Train a SentencePiece model on the documents of ``inputs``; write ``<out_prefix>.model``/``.vocab``.

    Deterministic for a given input and seed. ``vocab_size`` is an upper bound: on a corpus too small to fill it,
    training stops early instead of failing (check ``Tokenizer.vocab_size``). Returns the ``.model`` path.
    """
    if model_type not in MODEL_TYPES:
        raise InputError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    minimum = min_vocab_size(byte_fallback)
    if vocab_size < minimum:
        raise InputError(
            f"vocab_size={vocab_size} is too small: at least {minimum} is needed "
            f"({NUM_SPECIAL} special pieces{f' + {NUM_BYTE_PIECES} byte pieces' if byte_fallback else ''} + characters)"
        )
    if max_sentence_chars < 2:
        raise InputError(f"max_sentence_chars must be >= 2, got {max_sentence_chars}")
    if input_sentence_size < 1:
        raise InputError(f"input_sentence_size must be >= 1, got {input_sentence_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise InputError(f"character_coverage must be in (0, 1], got {character_coverage}")

    if isinstance(inputs, str | Path):
        inputs = [inputs]
    # Consume the first sentence here so that "no text" is a clear error rather than a SentencePiece crash.
    stats = ReadStats()
    sentences = iter_training_sentences(inputs, max_sentence_chars, stats, text_field)
    first = next(sentences, None)
    if first is None:
        raise InputError(f"no text found in {[str(p) for p in inputs]} to train a tokenizer on")

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    # Train into memory rather than to model_prefix: SentencePiece would record the output path inside the model,
    # and then the same corpus and seed would not give byte-identical files in different places.
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # SentencePiece samples input_sentence_size sentences with this generator
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_prepend(first, sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            # SentencePiece counts bytes, we count characters: 4 bytes per character so no sentence is dropped.
            max_sentence_length=4 * max_sentence_chars,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            # A soft limit: tiny corpora (tests, smoke runs) may not have enough distinct pieces for vocab_size.
            hard_vocab_limit=False,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _explain_training_error(exc, vocab_size) from exc
    for source, counter, count in stats.problems():
        log.warning("%s: %d x %s", source, count, counter)
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    model_path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(out_prefix.with_name(out_prefix.name + ".vocab"), "w", encoding="utf-8") as f:
        for i in range(processor.get_piece_size()):  # same layout as SentencePiece's own .vocab: piece<TAB>score
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
    return model_path


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _explain_training_error(exc: RuntimeError, vocab_size: int) -> Exception:
    match = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(exc))
    if match:
        needed = int(match.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is too small for this corpus: its characters plus the special and byte pieces "
            f"need at least {needed}; increase vocab_size or lower character_coverage"
        )
    return RuntimeError(f"SentencePiece training failed: {exc}")


@runtime_checkable
class TextTokenizer(Protocol):
    """What sparselm needs from a tokenizer: ids for text and back, the end-of-document id, the file it came from."""

    @property
    def path(self) -> Path: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...


SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A SentencePiece ``.model`` file, a Hugging Face ``tokenizer.json``, or a directory holding either (a
    checkpoint: SentencePiece first, as sparselm trains it; ``tokenizer.json`` for imported models)."""
    path = Path(path)
    if path.is_dir():
        if (path / SENTENCEPIECE_FILE).is_file():
            return Tokenizer.load(path / SENTENCEPIECE_FILE)
        if (path / HF_TOKENIZER_FILE).is_file():
            path = path / HF_TOKENIZER_FILE
        else:
            raise FileNotFoundError(f"{path} has no {SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE}")
    if path.suffix == ".json":
        from sparselm.data.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
    return Tokenizer.load(path)


class Tokenizer:
    """A loaded SentencePiece model. Use ``Tokenizer.load(path)``."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self._sp = processor
        self._path = path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise InputError(f"{path} is not a SentencePiece model: {exc}") from exc
        if processor.get_piece_size() <= EOS_ID or processor.eos_id() < 0:
            raise InputError(
                f"{path} has no end-of-sequence piece; train it with sparselm.data.tokenizer.train_tokenizer"
            )
        return cls(processor, path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        """End-of-document id (SentencePiece's eos), appended after every document in prepared data."""
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        if len(text) <= ENCODE_CHUNK_CHARS:
            return self._sp.encode(text)
        ids: list[int] = []
        for piece in split_text(text, ENCODE_CHUNK_CHARS):
            ids.extend(self._sp.encode(piece))
        return ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        texts = list(texts)
        if all(len(t) <= ENCODE_CHUNK_CHARS for t in texts):
            return self._sp.encode(texts, num_threads=num_threads)
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # SentencePiece wants Python ints; numpy arrays and torch tensors convert fastest through tolist().
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size})"
