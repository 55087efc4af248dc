"""Shared data fixtures: a tiny corpus, tokenizer and prepared dataset built once per test session (well under 5 s).

Treat them as read-only: they are shared by every test in the session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparselm.corpus import default_corpus_files
from sparselm.data.prepare import prepare
from sparselm.data.reader import iter_documents
from sparselm.data.tokenizer import Tokenizer, train_tokenizer

TINY_VOCAB_REQUEST = 512
_SLICE = slice(40_000, 60_000)  # from the middle of each book: prose rather than title pages and contents
_DOC_CHARS = 2_000


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL file of about 100 documents (~2,000 characters each, whole paragraphs) cut from the embedded books."""
    out = tmp_path_factory.mktemp("tiny_corpus") / "docs.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for book in iter_documents(default_corpus_files()):
            doc: list[str] = []
            for paragraph in book.text[_SLICE].split("\n\n")[1:-1]:  # drop the paragraphs the slice cut through
                doc.append(paragraph)
                if sum(len(p) for p in doc) >= _DOC_CHARS:
                    f.write(json.dumps({"text": "\n\n".join(doc) + "\n"}) + "\n")
                    doc = []
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A BPE tokenizer with at most 512 pieces (256 of them bytes) trained on ``tiny_corpus``."""
    path = train_tokenizer([tiny_corpus], tmp_path_factory.mktemp("tiny_tokenizer") / "tiny", TINY_VOCAB_REQUEST)
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def tiny_vocab_size(tiny_tokenizer: Tokenizer) -> int:
    """The real vocabulary size of ``tiny_tokenizer`` (use it for model.vocab_size)."""
    return tiny_tokenizer.vocab_size


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus: Path, tiny_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared directory of ``tiny_corpus``: ~60k train tokens in 4,096-token shards, ~10% of documents in val."""
    out = tmp_path_factory.mktemp("tiny_dataset") / "data"
    prepare(
        [tiny_corpus], tiny_tokenizer.path, out, val_fraction=0.1, seed=0, workers=1, shard_tokens=4096, progress=False
    )
    return out
