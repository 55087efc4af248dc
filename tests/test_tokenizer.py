"""Tokenizer training and the Tokenizer wrapper: exact round trips, byte fallback, special ids, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from sparselm.data.reader import iter_documents
from sparselm.data.tokenizer import (
    BOS_ID,
    ENCODE_CHUNK_CHARS,
    EOS_ID,
    UNK_ID,
    Tokenizer,
    min_vocab_size,
    split_text,
    train_tokenizer,
)

SAMPLE = "It was the best of times, it was the worst of times.\nThe 2nd  line has  double spaces\tand a tab.\n\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_special_ids_and_vocab(tiny_tokenizer: Tokenizer) -> None:
    assert (tiny_tokenizer.eod_id, tiny_tokenizer.bos_id) == (EOS_ID, BOS_ID) == (2, 1)
    assert min_vocab_size() < tiny_tokenizer.vocab_size <= 512
    assert tiny_tokenizer.id_to_piece(UNK_ID) == "<unk>"
    assert tiny_tokenizer.id_to_piece(3) == "<0x00>"  # byte pieces follow the three special pieces


@pytest.mark.parametrize(
    "text",
    [
        SAMPLE,
        "   leading and trailing spaces   ",
        "\n\nnewlines first\r\nand a CR",
        "",
        "digits 1234567890 and punctuation: ;!?()[]{}",
    ],
)
def test_round_trip_is_exact(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)


def test_byte_fallback_for_unseen_characters(tiny_tokenizer: Tokenizer) -> None:
    text = "Emoji 😀🚀, CJK 漢字かな한국어, math ∑∫≈, combining e\u0301, and a zero-width joiner 👩\u200d💻."
    ids = tiny_tokenizer.encode(text)
    assert UNK_ID not in ids  # never unknown: unseen characters become their UTF-8 bytes
    assert tiny_tokenizer.decode(ids) == text
    pieces = [tiny_tokenizer.id_to_piece(i) for i in tiny_tokenizer.encode("😀")]
    assert pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_decode_accepts_numpy_and_torch(tiny_tokenizer: Tokenizer) -> None:
    import numpy as np
    import torch

    ids = tiny_tokenizer.encode(SAMPLE)
    assert tiny_tokenizer.decode(np.array(ids, dtype=np.uint16)) == SAMPLE
    assert tiny_tokenizer.decode(torch.tensor(ids)) == SAMPLE


def test_encode_batch_matches_encode(tiny_tokenizer: Tokenizer) -> None:
    texts = [SAMPLE, "", "x", "more text " * 10]
    assert tiny_tokenizer.encode_batch(texts) == [tiny_tokenizer.encode(t) for t in texts]
    long = "word " * (ENCODE_CHUNK_CHARS // 2)
    assert tiny_tokenizer.encode_batch([long, "x"]) == [tiny_tokenizer.encode(long), tiny_tokenizer.encode("x")]


def test_long_text_is_encoded_in_chunks_with_identical_ids(tiny_tokenizer: Tokenizer) -> None:
    from sparselm.corpus import default_corpus_files

    book = next(iter_documents(default_corpus_files()[:1])).text
    assert len(book) > 4 * ENCODE_CHUNK_CHARS
    whole = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer.path)).encode(book)
    assert tiny_tokenizer.encode(book) == whole  # cuts fall on word starts, so chunking changes nothing
    assert tiny_tokenizer.decode(whole) == book


def test_split_text_bounds_and_cut_points() -> None:
    text = "alpha beta  gamma\ndelta " * 50 + "x" * 1000
    for limit in (2, 7, 64, 1000):
        pieces = list(split_text(text, limit))
        assert "".join(pieces) == text
        assert max(len(p) for p in pieces) <= limit
    pieces = list(split_text("one two three four five six", 10))
    assert pieces == ["one two", " three", " four five", " six"]  # each later piece starts at a word's space
    assert list(split_text("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]  # no whitespace: hard cuts
    assert list(split_text("", 10)) == []


def test_train_is_deterministic_for_both_model_types(tmp_path: Path) -> None:
    from sparselm.corpus import default_corpus_files

    text = next(iter_documents(default_corpus_files()[1:2])).text[:60_000]
    corpus = write(tmp_path / "corpus.txt", text)
    for model_type in ("bpe", "unigram"):
        a = train_tokenizer([corpus], tmp_path / f"{model_type}_a", 400, model_type=model_type, seed=3)
        b = train_tokenizer([corpus], tmp_path / f"{model_type}_b", 400, model_type=model_type, seed=3)
        assert a.name == f"{model_type}_a.model" and a.with_suffix(".vocab").is_file()
        assert a.read_bytes() == b.read_bytes()
        tok = Tokenizer.load(a)
        assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_small_vocab_on_tiny_corpus(tmp_path: Path) -> None:
    # 3 special + 256 byte pieces + a handful of characters: just above the minimum still trains.
    corpus = write(tmp_path / "tiny.txt", "abc abc cab bca\n" * 20)
    tok = Tokenizer.load(train_tokenizer([corpus], tmp_path / "t", vocab_size=min_vocab_size() + 8))
    assert tok.vocab_size <= min_vocab_size() + 8
    assert tok.decode(tok.encode("cab abc")) == "cab abc"


def test_training_input_kinds(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    write(tmp_path / "dir" / "a.txt", "hello world\n" * 30)
    write(tmp_path / "b.jsonl", '{"text": "jsonl line here"}\n' * 30)
    tok = Tokenizer.load(train_tokenizer([tmp_path / "dir", tmp_path / "b.jsonl"], tmp_path / "t", vocab_size=300))
    pieces = {tok.id_to_piece(i) for i in range(tok.vocab_size)}
    assert {"hello", "▁world", "jsonl", "▁line"} <= pieces


def test_train_errors(tmp_path: Path) -> None:
    corpus = write(tmp_path / "c.txt", SAMPLE * 10)
    with pytest.raises(ValueError, match="vocab_size=256 is too small: at least 260"):
        train_tokenizer([corpus], tmp_path / "t", vocab_size=256)
    with pytest.raises(ValueError, match="unknown model_type 'wordpiece'"):
        train_tokenizer([corpus], tmp_path / "t", vocab_size=300, model_type="wordpiece")
    with pytest.raises(ValueError, match="no text found"):
        train_tokenizer([write(tmp_path / "empty.txt", " \n\n")], tmp_path / "t", vocab_size=300)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t", vocab_size=300)
    # Enough for bytes, too few for the ~40 distinct characters this corpus keeps: a clear message, not a crash.
    with pytest.raises(ValueError, match="too small for this corpus"):
        train_tokenizer([corpus], tmp_path / "t", vocab_size=270, character_coverage=1.0)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(write(tmp_path / "junk.model", "not a model"))
