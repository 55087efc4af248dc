"""Read one input file into documents and reject records, streaming, without ever raising on bad data.

Plain text and JSONL (gzip or zstd compressed or not) are read by ``data.documents``, the reader ``sparselm
prepare`` uses too, here with its strict policy: a document with bad data is rejected, not repaired. This module adds
the pipeline's formats and extractors on top: Parquet, zip archives (each member read as text or JSONL by its name),
and extractors that decide what a document is inside a text stream:

- ``none``: the whole file (or zip member) is one document.
- ``gutenberg``: the whole file, Project Gutenberg header, credits and licence footer stripped (``data.gutenberg``).
- ``wikiextractor``: every ``<doc ...>`` ... ``</doc>`` block of a WikiExtractor dump is one document.
- ``lines``: every non-blank line; ``paragraphs``: every block between blank lines.
- ``auto``: ``wikiextractor`` if the first line opens a ``<doc``, else the whole file with Gutenberg stripping
  when its markers are present.

Everything that cannot become a document is yielded as a ``Record`` with a ``reason`` (invalid UTF-8, truncated or
corrupt compression, malformed JSON, a missing or non-string text field, a line over ``max_line_bytes``, a document
over ``max_document_bytes``, binary data, ...), so callers can account for every input document. A compressed file
that ends early yields one reject for the lost tail. Lines are read with a bounded ``readline``: a 50 MB line costs
``max_line_bytes`` of memory, never 50 MB.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from sparselm.config_loader import choices
from sparselm.data.documents import (
    BLANK,
    Cursor,
    InvalidUtf8,
    ReadPolicy,
    Record,
    Splitter,
    decode,
    is_jsonl,
    read_file,
    read_stream,
    snippet,
    walk,
)
from sparselm.data.gutenberg import book_text
from sparselm.data.streams import Line, bounded_lines

Format = Literal["auto", "text", "jsonl", "parquet", "zip"]
Extractor = Literal["auto", "none", "gutenberg", "wikiextractor", "lines", "paragraphs"]
FORMATS = choices(Format)
EXTRACTORS = choices(Extractor)
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class ReadOptions:
    format: Format = "auto"
    extractor: Extractor = "auto"
    text_field: str = "text"
    members: tuple[str, ...] = ("*",)  # zip members to read (fnmatch on the member's name or its path)
    max_line_bytes: int = 1 << 20
    max_document_bytes: int = 32 << 20
    invalid_utf8: InvalidUtf8 = "reject"

    @property
    def policy(self) -> ReadPolicy:
        """The shared reader's settings for these options: strict, every damaged document is a reject."""
        return ReadPolicy(self.text_field, self.invalid_utf8, self.max_line_bytes, self.max_document_bytes, strict=True)


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files matched by each pattern (a file, a directory walked recursively, or a glob with ``**``), sorted,
    without duplicates or hidden entries. Raises ``FileNotFoundError`` for a pattern that matches nothing."""
    found: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in _GLOB_CHARS):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            files = [p for p in matches if p.is_file()]
        elif Path(pattern).is_dir():
            files = walk(Path(pattern))
        else:
            files = [Path(pattern)] if Path(pattern).is_file() else []
        if not files:
            raise FileNotFoundError(f"{pattern!r} matched no file")
        found.extend(f for f in files if f not in found)
    return found


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".zip"):
        return "zip"
    return "jsonl" if is_jsonl(name) else "text"


def iter_records(path: str | Path, options: ReadOptions) -> Iterator[Record]:
    """Documents and rejects of one input file, in file order."""
    path = Path(path)
    fmt = detect_format(path, options.format)
    if fmt == "parquet":
        yield from _read_parquet(path, options)
    elif fmt == "zip":
        yield from _read_zip(path, options)
    else:
        yield from _documents(read_file(path, fmt, options.policy, _splitter(options)), options)


def _documents(records: Iterator[Record], options: ReadOptions) -> Iterator[Record]:
    """The shared reader's records as the pipeline wants them: no blank-line records, Gutenberg books stripped."""
    for record in records:
        if record.reason == BLANK:
            continue
        if record.line == 0 and record.text is not None and options.extractor in ("gutenberg", "auto"):
            text, stripped = book_text(record.text)  # a whole-stream document: perhaps a book
            if stripped:
                record = dataclasses.replace(record, text=text)
        yield record


def _splitter(options: ReadOptions) -> Splitter:
    def split(stream: IO[bytes], source: str, head: bytes, cursor: Cursor) -> Iterator[Record] | None:
        extractor = options.extractor
        if extractor == "auto" and head.lstrip().startswith(b"<doc"):
            extractor = "wikiextractor"
        if extractor in ("wikiextractor", "lines", "paragraphs"):
            return _split_records(stream, source, extractor, options.policy, cursor)
        return None  # one document per stream

    return split


class _Block:
    """The lines of one document being collected, or the reason it cannot be one."""

    def __init__(self, source: str, line: int) -> None:
        self.source, self.line = source, line
        self.parts: list[bytes] = []
        self.size = 0
        self.problem = ""

    def add(self, line: Line, policy: ReadPolicy) -> None:
        self.size += line.length
        if self.problem:
            return
        if line.data is None:
            self.problem, self.parts = "line_too_long", [line.head]
        elif policy.max_document_bytes and self.size > policy.max_document_bytes:
            self.problem, self.parts = "document_too_large", self.parts[:1]  # keep only what the snippet needs
        else:
            self.parts.append(line.data)

    def finish(self, policy: ReadPolicy, reason: str = "") -> Record:
        data = b"".join(self.parts[:3] if self.problem or reason else self.parts)
        if self.problem or reason:
            return Record(self.source, self.line, None, self.problem or reason, self.size, snippet(data))
        text, _ = decode(data, policy)
        if text is None:
            return Record(self.source, self.line, None, "invalid_utf8", self.size, snippet(data))
        return Record(self.source, self.line, text, size=self.size)


def _split_records(
    stream: IO[bytes], source: str, extractor: str, policy: ReadPolicy, cursor: Cursor
) -> Iterator[Record]:
    """Several documents per stream: WikiExtractor ``<doc>`` blocks, lines or paragraphs."""
    block: _Block | None = None
    in_doc = False  # inside <doc> ... </doc>
    for number, line in enumerate(bounded_lines(stream, policy.max_line_bytes), start=1):
        blank = line.data is not None and not line.data.strip()
        if extractor == "wikiextractor":
            tag = (line.data or line.head).strip()
            if tag.startswith(b"<doc ") or tag == b"<doc>":
                if block is not None:  # an unclosed document, or stray text, before this one
                    yield block.finish(policy, "unclosed_doc" if in_doc else "text_outside_doc")
                block, in_doc = _Block(source, number), True
                cursor.line = number
                continue
            if tag == b"</doc>":
                if block is not None:
                    yield block.finish(policy, "" if in_doc else "text_outside_doc")
                block, in_doc = None, False
                continue
            if blank and block is None:
                continue
        elif blank:  # a blank line ends a paragraph (and is no document of its own)
            if block is not None:
                yield block.finish(policy)
                block = None
            continue
        if block is None:
            block = _Block(source, number)
            cursor.line = number
        block.add(line, policy)
        if extractor == "lines":
            yield block.finish(policy)
            block = None
    if block is not None:
        yield block.finish(policy, "unclosed_doc" if in_doc else "")


# ---- containers ---------------------------------------------------------------------------------------------------


def _read_zip(path: Path, options: ReadOptions) -> Iterator[Record]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield Record(str(path), 0, None, "corrupt_zip", 0, str(exc)[:200])
        return
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            name = info.filename
            if info.is_dir() or any(part.startswith(".") for part in name.split("/")):
                continue
            base = name.rsplit("/", 1)[-1]
            if not any(fnmatch.fnmatch(name, m) or fnmatch.fnmatch(base, m) for m in options.members):
                continue
            where = f"{path}!{name}"
            try:
                member = archive.open(info)
            except (zipfile.BadZipFile, OSError, NotImplementedError) as exc:
                yield Record(where, 0, None, "corrupt_zip", info.compress_size, str(exc)[:200])
                continue
            with member:
                kind = "jsonl" if is_jsonl(name) else "text"
                yield from _documents(read_stream(member, where, kind, options.policy, _splitter(options)), options)


def _read_parquet(path: Path, options: ReadOptions) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        yield Record(str(path), 0, None, "corrupt_parquet", 0, str(exc)[:200])
        return
    if options.text_field not in names:
        for row in range(table.metadata.num_rows):
            yield Record(str(path), row + 1, None, "missing_text_field", 0, f"columns: {', '.join(names)}"[:200])
        return
    row = 0
    try:
        for batch in table.iter_batches(batch_size=256, columns=[options.text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    yield Record(str(path), row, None, "missing_text_field")
                elif not isinstance(value, str):
                    yield Record(str(path), row, None, "non_string_text", 0, snippet(repr(value)))
                else:
                    size = len(value.encode("utf-8", "replace"))
                    yield _check_sizes(Record(str(path), row, value, size=size), options)
    except (pa.ArrowException, OSError) as exc:
        yield Record(str(path), row + 1, None, "corrupt_parquet", 0, str(exc)[:200])


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


def _check_sizes(record: Record, options: ReadOptions) -> Record:
    """Apply the line and document limits to text that arrived whole (Parquet cells)."""
    text = record.text or ""
    reason = ""
    if record.size > options.max_document_bytes:
        reason = "document_too_large"
    # Only text over a quarter of the limit can hold a line over it (<= 4 bytes per character).
    elif len(text) > options.max_line_bytes // 4 and max(map(_utf8_length, text.split("\n"))) > options.max_line_bytes:
        reason = "line_too_long"
    return dataclasses.replace(record, text=None, reason=reason, snippet=snippet(text)) if reason else record
