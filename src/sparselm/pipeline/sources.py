"""Read one input file into documents and reject records, streaming, without ever raising on bad data.

Formats: plain text, JSONL (``.jsonl``, ``.json.gz``, ``.ndjson``...), Parquet and zip archives (each member read as
text or JSONL by its name). Text and JSONL may be gzip or zstd compressed; compression is sniffed from the magic
bytes, not trusted from the name. Extractors decide what a document is inside a text stream:

- ``none``: the whole file (or zip member) is one document.
- ``gutenberg``: the whole file, Project Gutenberg header, credits and licence footer stripped (``data.reader``).
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

import fnmatch
import glob
import gzip
import json
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from sparselm.config_loader import choices
from sparselm.data.reader import strip_gutenberg
from sparselm.pipeline.streams import bounded_lines, decompressed

Format = Literal["auto", "text", "jsonl", "parquet", "zip"]
Extractor = Literal["auto", "none", "gutenberg", "wikiextractor", "lines", "paragraphs"]
InvalidUtf8 = Literal["reject", "replace"]
FORMATS = choices(Format)
EXTRACTORS = choices(Extractor)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".jsonl.zst", ".json.zst", ".ndjson.gz")
SNIPPET_CHARS = 300
_SNIFF_BYTES = 8192
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


@dataclass(frozen=True)
class Record:
    """A document (``reason == ""``) or a reject; ``location`` is ``path[!member][:line]`` (lines 1-based)."""

    location: str
    text: str | None
    reason: str = ""
    size: int = 0  # bytes of raw input this record stands for
    snippet: str = ""  # start of a reject's raw data, for the rejects file


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files matched by each pattern (a file, a directory walked recursively, or a glob with ``**``), sorted,
    without duplicates or hidden entries. Raises ``FileNotFoundError`` for a pattern that matches nothing."""
    found: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in _GLOB_CHARS):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            files = [p for p in matches if p.is_file()]
        elif Path(pattern).is_dir():
            root = Path(pattern)
            files = [
                p
                for p in sorted(root.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            ]
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
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def iter_records(path: str | Path, options: ReadOptions) -> Iterator[Record]:
    """Documents and rejects of one input file, in file order."""
    path = Path(path)
    fmt = detect_format(path, options.format)
    if fmt == "parquet":
        yield from _read_parquet(path, options)
    elif fmt == "zip":
        yield from _read_zip(path, options)
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the generator finishes
        except OSError as exc:
            yield Record(str(path), None, "read_error", 0, str(exc)[:SNIPPET_CHARS])
            return
        with raw:
            yield from _read_stream(raw, str(path), fmt, options)


# ---- streams ------------------------------------------------------------------------------------------------------


def _snippet(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: SNIPPET_CHARS * 4].decode("utf-8", "replace")
    return data[:SNIPPET_CHARS]


class _Cursor:
    """Where the document being read starts, so a stream that breaks mid-document is rejected at that place."""

    def __init__(self, where: str) -> None:
        self.location = where


def _read_stream(raw: IO[bytes], where: str, fmt: str, options: ReadOptions) -> Iterator[Record]:
    cursor = _Cursor(where)
    try:
        stream = decompressed(raw)
        head = stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
        if b"\x00" in head:
            yield Record(where, None, "binary", len(head), _snippet(head))
            return
        if fmt == "jsonl":
            yield from _jsonl_records(stream, where, options, cursor)
            return
        extractor = options.extractor
        if extractor == "auto" and head.lstrip().startswith(b"<doc"):
            extractor = "wikiextractor"
        if extractor in ("wikiextractor", "lines", "paragraphs"):
            yield from _split_records(stream, where, extractor, options, cursor)
        else:
            yield from _whole_record(stream, where, extractor, options)
    except Exception as exc:  # a corrupt or cut stream (gzip, zstd, zip, I/O) is bad data, never a crash
        reason = _stream_error(exc)
        if reason == "read_error" and not isinstance(exc, OSError):
            raise  # not a stream problem: a bug, let it surface
        yield Record(cursor.location, None, reason, 0, f"{type(exc).__name__}: {exc}"[:200])


def _stream_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "truncated_zstd" if "zstd" in str(exc) else "truncated_gzip"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return "corrupt_gzip"
    if isinstance(exc, zipfile.BadZipFile):
        return "corrupt_zip"
    if type(exc).__name__ == "ZstdError":
        return "corrupt_zstd"
    return "read_error"


def _decode(data: bytes, where: str, options: ReadOptions) -> Record:
    try:
        return Record(where, data.decode("utf-8"), size=len(data))
    except UnicodeDecodeError:
        if options.invalid_utf8 == "replace":
            return Record(where, data.decode("utf-8", "replace"), size=len(data))
        return Record(where, None, "invalid_utf8", len(data), _snippet(data))


class _Block:
    """The lines of one document being collected, or the reason it cannot be one."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.parts: list[bytes] = []
        self.size = 0
        self.problem = ""

    def add(self, line: bytes | None, length: int, head: bytes, options: ReadOptions) -> None:
        self.size += length
        if self.problem:
            return
        if line is None:
            self.problem, self.parts = "line_too_long", [head]
        elif self.size > options.max_document_bytes:
            self.problem, self.parts = "document_too_large", self.parts[:1]  # keep only what the snippet needs
        else:
            self.parts.append(line)

    def finish(self, options: ReadOptions, reason: str = "") -> Record:
        if self.problem or reason:
            return Record(self.location, None, self.problem or reason, self.size, _snippet(b"".join(self.parts[:3])))
        return _decode(b"".join(self.parts), self.location, options)


def _whole_record(stream: IO[bytes], where: str, extractor: str, options: ReadOptions) -> Iterator[Record]:
    block = _Block(where)
    for line, length, head in bounded_lines(stream, options.max_line_bytes):
        block.add(line, length, head, options)
        if block.problem:
            break  # one document per file: the rest of it cannot change the verdict
    record = block.finish(options)
    if record.text is not None and extractor in ("gutenberg", "auto"):
        text = record.text.replace("\r\n", "\n")
        stripped = strip_gutenberg(text) if ("Gutenberg" in text or "GUTENBERG" in text) else None
        if stripped is not None:
            record = Record(where, stripped, size=record.size)
    yield record


def _split_records(
    stream: IO[bytes], where: str, extractor: str, options: ReadOptions, cursor: _Cursor
) -> Iterator[Record]:
    """Several documents per stream: WikiExtractor ``<doc>`` blocks, lines or paragraphs."""
    block: _Block | None = None
    in_doc = False  # inside <doc> ... </doc>
    for lineno, (line, length, head) in enumerate(bounded_lines(stream, options.max_line_bytes), start=1):
        blank = line is not None and not line.strip()
        if extractor == "wikiextractor":
            tag = (line or head).strip()
            if tag.startswith(b"<doc ") or tag == b"<doc>":
                if block is not None:  # an unclosed document, or stray text, before this one
                    yield block.finish(options, "unclosed_doc" if in_doc else "text_outside_doc")
                block, in_doc = _Block(f"{where}:{lineno}"), True
                cursor.location = block.location
                continue
            if tag == b"</doc>":
                if block is not None:
                    yield block.finish(options, "" if in_doc else "text_outside_doc")
                block, in_doc = None, False
                continue
            if blank and block is None:
                continue
        elif blank:  # a blank line ends a paragraph (and is no document of its own)
            if block is not None:
                yield block.finish(options)
                block = None
            continue
        if block is None:
            block = _Block(f"{where}:{lineno}")
            cursor.location = block.location
        block.add(line, length, head, options)
        if extractor == "lines":
            yield block.finish(options)
            block = None
    if block is not None:
        yield block.finish(options, "unclosed_doc" if in_doc else "")


def _jsonl_records(stream: IO[bytes], where: str, options: ReadOptions, cursor: _Cursor) -> Iterator[Record]:
    lineno = 0
    cursor.location = f"{where}:1"
    for line, length, head in bounded_lines(stream, options.max_line_bytes):
        lineno += 1
        location = f"{where}:{lineno}"
        cursor.location = f"{where}:{lineno + 1}"  # if the stream breaks now, the next line is the one lost
        if line is None:
            yield Record(location, None, "line_too_long", length, _snippet(head))
            continue
        if not line.strip():
            continue  # blank lines are layout, not documents
        decoded = _decode(line, location, options)
        if decoded.text is None:
            yield decoded
            continue
        yield _json_text(decoded.text, location, length, options.text_field)


def _json_text(line: str, location: str, size: int, field: str) -> Record:
    try:
        obj = json.loads(line)
    except ValueError:
        return Record(location, None, "malformed_json", size, _snippet(line))
    if not isinstance(obj, dict) or field not in obj or obj[field] is None:
        reason = "malformed_json" if not isinstance(obj, dict) else "missing_text_field"
        return Record(location, None, reason, size, _snippet(line))
    text = obj[field]
    if not isinstance(text, str):
        return Record(location, None, "non_string_text", size, _snippet(line))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800": not encodable text
        return Record(location, None, "invalid_utf8", size, _snippet(line))
    return Record(location, text, size=size)


# ---- containers ---------------------------------------------------------------------------------------------------


def _read_zip(path: Path, options: ReadOptions) -> Iterator[Record]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield Record(str(path), None, "corrupt_zip", 0, str(exc)[:200])
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
                yield Record(where, None, "corrupt_zip", info.compress_size, str(exc)[:200])
                continue
            with member:
                fmt = "jsonl" if name.lower().endswith(JSONL_SUFFIXES) else "text"
                yield from _read_stream(member, where, fmt, options)


def _read_parquet(path: Path, options: ReadOptions) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        yield Record(str(path), None, "corrupt_parquet", 0, str(exc)[:200])
        return
    if options.text_field not in names:
        for row in range(table.metadata.num_rows):
            yield Record(f"{path}:{row + 1}", None, "missing_text_field", 0, f"columns: {', '.join(names)}"[:200])
        return
    row = 0
    try:
        for batch in table.iter_batches(batch_size=256, columns=[options.text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                where = f"{path}:{row}"
                if value is None:
                    yield Record(where, None, "missing_text_field")
                elif not isinstance(value, str):
                    yield Record(where, None, "non_string_text", 0, _snippet(repr(value)))
                else:
                    yield _check_sizes(Record(where, value, size=len(value.encode("utf-8", "replace"))), options)
    except (pa.ArrowException, OSError) as exc:
        yield Record(f"{path}:{row + 1}", None, "corrupt_parquet", 0, str(exc)[:200])


def _check_sizes(record: Record, options: ReadOptions) -> Record:
    """Apply the line and document limits to text that arrived whole (Parquet cells)."""
    text = record.text or ""
    if record.size > options.max_document_bytes:
        return Record(record.location, None, "document_too_large", record.size, _snippet(text))
    if len(text) > options.max_line_bytes // 4:  # only then can a line exceed the limit (<= 4 bytes per char)
        longest = max(len(line.encode("utf-8", "replace")) for line in text.split("\n"))
        if longest > options.max_line_bytes:
            return Record(record.location, None, "line_too_long", record.size, _snippet(text))
    return record
