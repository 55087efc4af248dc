"""Reading sources: formats, extractors, and every kind of bad input turned into a reject record with a reason."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sparselm.pipeline.sources import ReadOptions, Record, expand_paths, iter_records

BOOK = (
    "The Project Gutenberg EBook of A Tale, by Somebody\r\n\r\nRelease Date: 1901\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\nProduced by Volunteers\r\n\r\n"
    "CHAPTER I\r\n\r\nIt was a bright cold day.\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\nThe licence text follows here.\r\n"
)
WIKI = (
    '<doc id="1" url="http://x/1" title="Alpha">\nAlpha\n\nAlpha is the first letter.\n</doc>\n'
    '<doc id="2" url="http://x/2" title="Beta">\nBeta\n\nBeta is the second letter.\n</doc>\n'
    '<doc id="3" url="http://x/3" title="Gamma">\nGamma\n\nThe dump was cut off here'
)


def read(path: Path, **options: object) -> list[Record]:
    return list(iter_records(path, ReadOptions(**options)))


def reasons(records: list[Record]) -> list[str]:
    return [r.reason or "doc" for r in records]


def jsonl(*records: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def test_gutenberg_and_wikiextractor_extractors(tmp_path: Path) -> None:
    book = tmp_path / "book.txt"
    book.write_bytes(BOOK.encode())
    (doc,) = read(book, extractor="gutenberg")
    assert doc.text.startswith("CHAPTER I") and "licence" not in doc.text and "Produced by" not in doc.text
    (raw,) = read(book, extractor="none")
    assert "START OF THIS PROJECT" in raw.text

    wiki = tmp_path / "wiki_00"
    wiki.write_text(WIKI)
    records = read(wiki, extractor="auto")  # auto sees the <doc line
    assert reasons(records) == ["doc", "doc", "unclosed_doc"]
    assert records[0].text == "Alpha\n\nAlpha is the first letter.\n" and records[1].location.endswith(":6")


def test_lines_and_paragraphs_extractors(tmp_path: Path) -> None:
    path = tmp_path / "posts.txt"
    path.write_text("first post\nsecond post\n\n\nthird post\n")
    assert [r.text for r in read(path, extractor="lines")] == ["first post\n", "second post\n", "third post\n"]
    assert [r.text for r in read(path, extractor="paragraphs")] == ["first post\nsecond post\n", "third post\n"]


def test_compressed_jsonl_parquet_and_zip(tmp_path: Path) -> None:
    rows = jsonl({"text": "one"}, {"text": "two", "url": "u"})
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(rows))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows))
    pq.write_table(pa.table({"content": ["p1", None, "p3"]}), tmp_path / "c.parquet")
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("corpus/x.txt", "member text\n")
        z.writestr("corpus/y.jsonl", rows.decode())
        z.writestr("corpus/README", "not wanted\n")
    assert [r.text for r in read(tmp_path / "a.jsonl.gz")] == ["one", "two"]
    assert [r.text for r in read(tmp_path / "b.jsonl.zst")] == ["one", "two"]
    parquet = read(tmp_path / "c.parquet", text_field="content")
    assert reasons(parquet) == ["doc", "missing_text_field", "doc"] and parquet[2].location.endswith(":3")
    assert reasons(read(tmp_path / "c.parquet")) == ["missing_text_field"] * 3  # no "text" column at all
    members = read(tmp_path / "d.zip", members=("*.txt", "*.jsonl"))
    assert [r.text for r in members] == ["member text\n", "one", "two"]
    assert members[0].location.endswith("d.zip!corpus/x.txt")


def test_every_kind_of_bad_input_is_a_reject_with_a_reason(tmp_path: Path) -> None:
    good = {"text": "a fine document"}
    bad_jsonl = jsonl(good, "{broken json", {"body": "no text field"}, {"text": 42}, [1, 2], "", good)
    bad_jsonl += b'{"text": "caf\xe9"}\n' + b'{"text": "lone \\ud800 surrogate"}\n'
    (tmp_path / "bad.jsonl").write_bytes(bad_jsonl)
    records = read(tmp_path / "bad.jsonl")
    assert reasons(records) == [
        "doc",
        "malformed_json",
        "missing_text_field",
        "non_string_text",
        "malformed_json",
        "doc",
        "invalid_utf8",
        "invalid_utf8",
    ]
    assert records[1].location.endswith("bad.jsonl:2") and records[1].snippet == "{broken json\n"

    gz = gzip.compress(jsonl(*[{"text": f"document number {i} " * 20} for i in range(200)]))
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    cut = read(tmp_path / "cut.jsonl.gz")
    assert 0 < len(cut) - 1 < 200 and reasons(cut)[-1] == "truncated_gzip" and set(reasons(cut)[:-1]) == {"doc"}
    zst = zstandard.ZstdCompressor().compress(jsonl(*[{"text": f"doc {i} " * 50} for i in range(500)]))
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    assert reasons(read(tmp_path / "cut.jsonl.zst"))[-1] == "truncated_zstd"
    book = gzip.compress(" ".join(f"word{i}" for i in range(50_000)).encode())
    (tmp_path / "cut.txt.gz").write_bytes(book[: len(book) // 2])
    assert reasons(read(tmp_path / "cut.txt.gz")) == ["truncated_gzip"]
    (tmp_path / "not-gzip.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    assert reasons(read(tmp_path / "not-gzip.gz")) == ["corrupt_gzip"]

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert reasons(read(tmp_path / "latin1.txt")) == ["invalid_utf8"]
    (repaired,) = read(tmp_path / "latin1.txt", invalid_utf8="replace")
    assert repaired.text == "caf\ufffd au lait"
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert reasons(read(tmp_path / "image.png")) == ["binary"]
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert reasons(read(tmp_path / "broken.zip")) == ["corrupt_zip"]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    assert reasons(read(tmp_path / "broken.parquet")) == ["corrupt_parquet"]


def test_a_50_mb_single_line_is_rejected_without_holding_it(tmp_path: Path) -> None:
    line = b"x" * (50 << 20)
    (tmp_path / "huge.txt").write_bytes(line)
    (tmp_path / "huge.jsonl").write_bytes(
        jsonl({"text": "before"}) + b'{"text": "' + line + b'"}\n' + jsonl({"text": "after"})
    )
    (record,) = read(tmp_path / "huge.txt")
    assert record.reason == "line_too_long" and record.size == len(line) and len(record.snippet) <= 300
    assert reasons(read(tmp_path / "huge.jsonl")) == ["doc", "line_too_long", "doc"]
    (tmp_path / "big.txt").write_bytes(b"a short line\n" * 200_000)  # 2.6 MB in short lines
    assert reasons(read(tmp_path / "big.txt", max_document_bytes=1 << 20)) == ["document_too_large"]


def test_expand_paths_globs_directories_and_missing(tmp_path: Path) -> None:
    for name in ("a/1.txt", "a/b/2.txt", "a/.hidden/3.txt", "a/4.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [p.name for p in expand_paths([str(tmp_path / "a")])] == ["1.txt", "4.jsonl", "2.txt"]
    assert [p.name for p in expand_paths([str(tmp_path / "a/**/*.txt")])] == ["1.txt", "2.txt"]
    with pytest.raises(FileNotFoundError, match="matched no file"):
        expand_paths([str(tmp_path / "nothing-*.txt")])
