"""How a byte stream becomes documents: the one reader under ``sparselm prepare`` (``data.reader``) and the data
pipeline (``pipeline.sources``).

A stream (a file, a zip member) is decompressed by its magic bytes (gzip, zstd) and read either as one document
(``text``) or as one JSON object per line (``jsonl``, the document in ``text_field``). Each outcome is a ``Record``:
a document (``text``) or a reject (``reason``), with where it starts, how many bytes it stands for and a snippet of
the raw data; repairs made to a kept document are listed in its ``notes``. Bad data never raises.

``ReadPolicy`` decides what bad data costs:

- invalid UTF-8 (bytes, or a lone surrogate escape in JSON): replaced with U+FFFD and noted, or the document rejected
  (``invalid_utf8``);
- a line over ``max_line_bytes``, a compressed stream cut short or corrupt, NUL bytes in the first 8 KiB: noted
  while the document is kept (the readable part of a cut stream, complete lines only for JSONL), or with ``strict``
  the document is rejected (``line_too_long``, ``truncated_gzip``/``_zstd``, ``corrupt_gzip``/``_zstd``,
  ``binary``); either way an over-long line is read in bounded pieces when it is not kept;
- a document over ``max_document_bytes`` (0: no limit) is rejected.

JSONL lines that are not documents are rejects: ``malformed_json`` (not JSON, or not an object),
``missing_text_field`` (absent or null), ``non_string_text``. Blank lines are layout: a ``BLANK`` record that only
accounts for their bytes. A file that cannot be read is a ``read_error``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from sparselm.data.streams import SNIPPET_BYTES, bounded_lines, decompressed, stream_error

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst", ".ndjson.zst")
BLANK = "blank_line"  # the reason of a blank JSONL line's record: neither a document nor a reject
SNIPPET_CHARS = 300
_SNIFF_BYTES = 8192
_READ_CHUNK_BYTES = 1 << 20
# A JSON escape for a UTF-16 surrogate: json.loads accepts lone ones, which cannot be encoded to UTF-8 later.
_JSON_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")

InvalidUtf8 = Literal["reject", "replace"]
Kind = Literal["text", "jsonl"]


@dataclass(frozen=True)
class ReadPolicy:
    text_field: str = "text"  # the JSONL field holding the document
    invalid_utf8: InvalidUtf8 = "replace"
    max_line_bytes: int = 1 << 20
    max_document_bytes: int = 0  # 0: no limit
    strict: bool = False  # reject documents with over-long lines, cut or corrupt compression, binary data


@dataclass(frozen=True)
class Record:
    """A document (``text`` is not None) or a reject (``reason``) read from ``source`` (``path[!member]``)."""

    source: str
    line: int  # 1-based line where it starts; 0 when it is the whole stream
    text: str | None
    reason: str = ""
    size: int = 0  # bytes of (decompressed) input it stands for
    snippet: str = ""  # the start of a reject's raw data
    notes: tuple[str, ...] = ()  # repairs made while reading it: invalid_utf8, long_line, truncated_gzip, ...

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class Cursor:
    """The line where the record being read starts, so a stream that breaks mid-record is rejected at that place."""

    def __init__(self) -> None:
        self.line = 0


# A reader's hook for other ways to cut a text stream into documents: (stream, source, head, cursor) -> the records,
# or None to read the stream as one document. ``head`` is the stream's first bytes.
Splitter = Callable[[IO[bytes], str, bytes, Cursor], Iterator[Record] | None]


def is_jsonl(name: str) -> bool:
    return name.lower().endswith(JSONL_SUFFIXES)


def walk(root: Path) -> list[Path]:
    """The files under directory ``root``, recursively, sorted, without hidden files and folders (.git, .DS_Store)."""
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def read_file(path: str | Path, kind: Kind, policy: ReadPolicy, split: Splitter | None = None) -> Iterator[Record]:
    """The records of one file, in file order."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the generator finishes
    except OSError as exc:
        yield Record(str(path), 0, None, "read_error", 0, snippet(str(exc)))
        return
    with raw:
        yield from read_stream(raw, str(path), kind, policy, split)


def read_stream(
    raw: IO[bytes], source: str, kind: Kind, policy: ReadPolicy, split: Splitter | None = None
) -> Iterator[Record]:
    """The records of one byte stream (possibly compressed), in order."""
    cursor = Cursor()
    try:
        stream = decompressed(raw)
        head = b""
        if policy.strict or split is not None:
            head = stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
            if policy.strict and b"\x00" in head:
                yield Record(source, 0, None, "binary", len(head), snippet(head))
                return
        if kind == "jsonl":
            yield from _jsonl_records(stream, source, policy, cursor)
            return
        records = split(stream, source, head, cursor) if split is not None else None
        if records is not None:
            yield from records
        else:
            yield _whole_document(stream, source, policy)
    except Exception as exc:  # a cut or corrupt stream (gzip, zstd, zip, I/O) is bad data, never a crash
        reason = stream_error(exc)
        if reason is None:
            raise  # not a stream problem: a bug, let it surface
        yield Record(source, cursor.line, None, reason, 0, f"{type(exc).__name__}: {exc}"[:200])


def decode(data: bytes, policy: ReadPolicy) -> tuple[str | None, tuple[str, ...]]:
    """(text, notes) of UTF-8 ``data``: None when it is invalid and the policy rejects it."""
    try:
        return data.decode("utf-8"), ()
    except UnicodeDecodeError:
        if policy.invalid_utf8 == "reject":
            return None, ()
        return data.decode("utf-8", "replace"), ("invalid_utf8",)


def snippet(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: SNIPPET_CHARS * 4].decode("utf-8", "replace")
    return data[:SNIPPET_CHARS]


def _whole_document(stream: IO[bytes], source: str, policy: ReadPolicy) -> Record:
    """The stream as one document, read in chunks no longer than a line may be: then an over-long line can only
    span chunk edges, and finding one needs no line splitting (linear time, constant extra memory)."""
    limit = policy.max_line_bytes
    parts: list[bytes] = []
    notes: list[str] = []
    size = run = 0  # run: bytes of the line in progress
    cut = False
    try:
        while chunk := stream.read1(min(_READ_CHUNK_BYTES, limit)):
            before = run
            size += len(chunk)
            parts.append(chunk)
            newline = chunk.find(b"\n")
            ended_long = newline >= 0 and before + newline > limit
            run = len(chunk) - chunk.rfind(b"\n") - 1 if newline >= 0 else run + len(chunk)
            if policy.strict and (ended_long or run > limit):
                return _long_line(stream, source, parts, size, before, newline if ended_long else -1)
            if ended_long:
                notes.append("long_line")
            if policy.max_document_bytes and size > policy.max_document_bytes:
                return _too_large(stream, source, parts, size, policy.max_document_bytes)
    except Exception as exc:
        reason = stream_error(exc)
        if policy.strict or reason in (None, "read_error"):
            raise
        notes.append(reason)  # keep what was decompressed before the cut
        cut = True
    if run > limit:
        notes.append("long_line")
    data = b"".join(parts)
    del parts
    if cut:
        data = _trim_partial_utf8(data)
    text, repaired = decode(data, policy)
    if text is None:
        return Record(source, 0, None, "invalid_utf8", len(data), snippet(data))
    return Record(source, 0, text, size=len(data), notes=(*notes, *repaired))


def _long_line(stream: IO[bytes], source: str, parts: list[bytes], size: int, before: int, newline: int) -> Record:
    """The reject of a document whose line that started ``before`` bytes ahead of the last chunk is too long; the
    rest of the line is read (it counts in the reject's size) but not kept."""
    data = b"".join(parts)
    start = len(data) - len(parts[-1]) - before
    head = data[start : start + SNIPPET_BYTES]
    if newline >= 0:  # the line ends in the last chunk
        size -= len(parts[-1]) - newline - 1
    else:
        size += _rest_of_line(stream)
    return Record(source, 0, None, "line_too_long", size, snippet(head))


def _too_large(stream: IO[bytes], source: str, parts: list[bytes], size: int, limit: int) -> Record:
    """The reject of a document over ``limit`` bytes; its size counts up to the end of the line that crossed the
    limit, its snippet is the first line."""
    last = parts[-1]
    end = last.find(b"\n", limit - (size - len(last)))
    size += _rest_of_line(stream) if end < 0 else end + 1 - len(last)
    first = parts[0].find(b"\n")
    return Record(
        source, 0, None, "document_too_large", size, snippet(parts[0][: first + 1] if first >= 0 else parts[0])
    )


def _rest_of_line(stream: IO[bytes]) -> int:
    """Read up to and including the next newline without keeping it; the number of bytes read."""
    read = 0
    while chunk := stream.read1(_READ_CHUNK_BYTES):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return read + newline + 1
        read += len(chunk)
    return read


def _jsonl_records(stream: IO[bytes], source: str, policy: ReadPolicy, cursor: Cursor) -> Iterator[Record]:
    cursor.line = 1
    for number, line in enumerate(bounded_lines(stream, policy.max_line_bytes, keep_long=not policy.strict), 1):
        cursor.line = number + 1  # if the stream breaks now, the next line is the one lost
        if line.data is None:
            yield Record(source, number, None, "line_too_long", line.length, snippet(line.head))
            continue
        notes = ("long_line",) if line.too_long else ()
        if not line.data.strip():
            yield Record(source, number, None, BLANK, line.length, notes=notes)
            continue
        text, repaired = decode(line.data, policy)
        if text is None:
            yield Record(source, number, None, "invalid_utf8", line.length, snippet(line.data), notes)
            continue
        yield _json_document(text, source, number, line.length, policy, (*notes, *repaired))


def _json_document(
    line: str, source: str, number: int, size: int, policy: ReadPolicy, notes: tuple[str, ...]
) -> Record:
    def reject(reason: str) -> Record:
        return Record(source, number, None, reason, size, snippet(line), notes)

    try:
        obj = json.loads(line)
    except ValueError:
        return reject("malformed_json")
    if not isinstance(obj, dict):
        return reject("malformed_json")  # valid JSON, but a bare value or list has no text field to read
    text = obj.get(policy.text_field)
    if text is None:
        return reject("missing_text_field")
    if not isinstance(text, str):
        return reject("non_string_text")
    if _JSON_SURROGATE.search(line):
        repaired = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if repaired != text:  # a lone surrogate such as "\ud800": not encodable text
            if policy.invalid_utf8 == "reject":
                return reject("invalid_utf8")
            text, notes = repaired, (*notes, "invalid_utf8")
    return Record(source, number, text, size=size, notes=notes)


def _trim_partial_utf8(data: bytes) -> bytes:
    """Drop an incomplete multi-byte character at the very end (where a truncated stream stops)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        needed = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return data[:-back] if needed > back else data
    return data
