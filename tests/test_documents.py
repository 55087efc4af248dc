"""The one document reader: prepare's lenient policy and the pipeline's strict one make the same decisions about the
same bytes, one keeping and noting what the other rejects."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from sparselm.data.documents import BLANK, ReadPolicy, Record, read_file
from sparselm.data.gutenberg import normalize_text
from sparselm.data.reader import ReadStats, iter_documents
from sparselm.pipeline.sources import ReadOptions, iter_records

LENIENT = ReadPolicy(max_line_bytes=4096)  # prepare's (with a smaller line limit)
STRICT = ReadPolicy(invalid_utf8="reject", max_line_bytes=4096, strict=True)  # the pipeline's
LONG = b"x" * 5000  # over STRICT's line limit


def jsonl(*records: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def outcome(records: list[Record]) -> list[tuple[str, tuple[str, ...]]]:
    """(reason or "doc", notes) per record."""
    return [(r.reason or "doc", r.notes) for r in records]


@pytest.mark.parametrize(
    ("name", "data", "kind", "lenient", "strict"),
    [
        ("latin1.txt", "caf\xe9".encode("latin-1"), "text", [("doc", ("invalid_utf8",))], [("invalid_utf8", ())]),
        ("long.txt", LONG + b"\nshort\n", "text", [("doc", ("long_line",))], [("line_too_long", ())]),
        (
            "cut.txt.gz",
            cut(gzip.compress("\n".join(f"w{i}" for i in range(50_000)).encode())),
            "text",
            [("doc", ("truncated_gzip",))],
            [("truncated_gzip", ())],
        ),
        (
            "cut.txt.zst",
            cut(zstandard.ZstdCompressor().compress("\n".join(f"w{i}" for i in range(50_000)).encode())),
            "text",
            [("doc", ("truncated_zstd",))],
            [("truncated_zstd", ())],
        ),
        ("nul.txt", b"text\x00with a NUL\n", "text", [("doc", ())], [("binary", ())]),
        (
            "bad.jsonl",
            jsonl({"text": "ok"}) + b'{"text": "caf\xe9"}\n',
            "jsonl",
            [("doc", ()), ("doc", ("invalid_utf8",))],
            [("doc", ()), ("invalid_utf8", ())],
        ),
        (
            "long.jsonl",
            b'{"text": "' + LONG + b'"}\n' + jsonl({"text": "after"}),
            "jsonl",
            [("doc", ("long_line",)), ("doc", ())],
            [("line_too_long", ()), ("doc", ())],
        ),
        (
            "null.jsonl",
            jsonl({"text": None}, "", [1], {"text": 3}),
            "jsonl",
            [("missing_text_field", ()), (BLANK, ()), ("malformed_json", ()), ("non_string_text", ())],
            [("missing_text_field", ()), (BLANK, ()), ("malformed_json", ()), ("non_string_text", ())],
        ),
        (
            "surrogate.jsonl",
            b'{"text": "lone \\ud800"}\n',
            "jsonl",
            [("doc", ("invalid_utf8",))],
            [("invalid_utf8", ())],
        ),
    ],
)
def test_one_decision_two_policies(tmp_path: Path, name, data, kind, lenient, strict) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    kept = list(read_file(path, kind, LENIENT))
    assert outcome(kept) == lenient
    assert outcome(list(read_file(path, kind, STRICT))) == strict
    assert all(r.text is None or r.text.encode("utf-8") for r in kept)  # whatever is kept is valid text


def test_prepare_counts_and_the_pipeline_rejects_the_same_damage(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.zst").write_bytes(
        cut(zstandard.ZstdCompressor().compress(jsonl(*[{"text": f"doc {i} " * 9} for i in range(9000)])))
    )
    (tmp_path / "b.jsonl").write_bytes(jsonl({"text": None}, {"text": "fine"}))
    stats = ReadStats()
    docs = list(iter_documents([tmp_path], stats=stats))
    counters = {Path(source).name: c for source, c in stats.files.items()}
    assert counters["a.jsonl.zst"]["truncated_zstd"] == 1 and counters["b.jsonl"]["missing_text_field"] == 1
    assert "truncated_zstd" in {key for _, key, _ in stats.problems()}
    assert len(docs) == 1 + counters["a.jsonl.zst"]["documents"] > 1
    rejects = [r.reason for path in sorted(tmp_path.iterdir()) for r in iter_records(path, ReadOptions()) if r.reason]
    assert rejects == ["truncated_zstd", "missing_text_field"]


def test_prepare_and_the_pipeline_read_the_same_documents_from_good_files(tmp_path: Path) -> None:
    book = (
        "The Project Gutenberg EBook of A Tale\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\n"
        "CHAPTER I\r\n\r\nIt was a bright cold day.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\nlicence\r\n"
    )
    (tmp_path / "book.txt").write_text(book)
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress("\ufeffWindows\r\nnotes\r\n".encode()))
    rows = jsonl({"text": "one"}, "", {"text": "two\nlines", "id": 2})
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(rows))
    (tmp_path / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows))
    prepared = [(Path(d.source).name, d.text) for d in iter_documents([tmp_path])]
    piped = [
        (path.name, normalize_text(r.text or ""))
        for path in sorted(tmp_path.iterdir())
        for r in iter_records(path, ReadOptions())
    ]
    assert prepared == piped
    assert prepared[0] == ("book.txt", "CHAPTER I\n\nIt was a bright cold day.\n")
