"""Read training documents from text, JSONL and gzip inputs, counting bad data instead of failing on it.

One corrupt line in a 20 GB crawl should cost one line, not the whole run, so every problem is counted per input
file in ``ReadStats`` and the reader moves on. Only a missing input path raises: that is a typo, not bad data.

Input kinds (decided by file name, case-insensitive):

- ``.jsonl``, ``.jsonl.gz``, ``.json.gz``: one JSON object per line, the text in ``text_field``; one line = one
  document, streamed line by line.
- ``.gz`` (e.g. ``.txt.gz``): gzip-compressed plain text; the whole file = one document.
- anything else given explicitly, and ``.txt``, ``.text``, ``.md`` or extension-less files found in directories:
  plain text, the whole file = one document.

Directories are walked recursively in sorted order, skipping hidden entries. Text is decoded as UTF-8 with
replacement characters, line endings become LF and Project Gutenberg boilerplate is stripped. A truncated gzip file
keeps what could be decompressed (complete lines only, for JSONL).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
DIRECTORY_SUFFIXES = (".txt", ".text", ".md", ".txt.gz", *JSONL_SUFFIXES)

# Lines longer than this are reported: they usually mean minified or binary data slipped into a text corpus.
VERY_LONG_LINE_BYTES = 1 << 20
_READ_CHUNK_BYTES = 1 << 20  # must stay <= VERY_LONG_LINE_BYTES, see _LineLengthTracker

# Counters kept for every input file. The ones in PROBLEM_COUNTERS describe bad data and are worth a warning.
COUNTERS = (
    "documents",
    "bytes",
    "invalid_utf8",
    "empty_documents",
    "malformed_json",
    "missing_text_field",
    "non_string_text",
    "truncated_gzip",
    "corrupt_gzip",
    "read_errors",
    "very_long_lines",
    "gutenberg_stripped",
)
PROBLEM_COUNTERS = (
    "invalid_utf8",
    "empty_documents",
    "malformed_json",
    "missing_text_field",
    "non_string_text",
    "truncated_gzip",
    "corrupt_gzip",
    "read_errors",
    "very_long_lines",
)

_PG_START = re.compile(
    # The marker's closing *** sometimes wraps onto the next line, so allow a short run without '*' before it.
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG(?:[^*]{0,300}\*{3})?"
    r"|\*END\*THE SMALL PRINT)[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_PG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG|End of (?:the |this )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)
# Volunteer and transcriber credits that PG puts right after the start marker; not part of the book.
_PG_CREDITS = re.compile(
    r"\A\s*(?:Produced by|(?:Text|HTML) file produced by|E-?text prepared by|This e-?text was (?:created|prepared) by"
    r"|Transcribed (?:from|by))[^\n]*(?:\n[^\n]+)*",
    re.IGNORECASE,
)
# A JSON escape for a UTF-16 surrogate: json.loads accepts lone ones, which cannot be encoded to UTF-8 later.
_JSON_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True)
class Document:
    source: str  # the input file it came from, as a path string
    index: int  # position in its source: 0-based line number for JSONL, 0 for a whole-file document
    text: str


@dataclass
class ReadStats:
    """Per-file counters (see ``COUNTERS``) filled in while documents are read."""

    files: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # files in input directories with an unsupported extension

    def file(self, source: str) -> dict[str, int]:
        return self.files.setdefault(source, dict.fromkeys(COUNTERS, 0))

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(COUNTERS, 0)
        for counters in self.files.values():
            for key, value in counters.items():
                totals[key] = totals.get(key, 0) + value
        totals["files"] = len(self.files)
        totals["skipped_files"] = len(self.skipped)
        return totals

    def problems(self) -> list[tuple[str, str, int]]:
        """(source, counter, count) for every bad-data counter that is non-zero."""
        return [(src, key, c[key]) for src, c in self.files.items() for key in PROBLEM_COUNTERS if c.get(key)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": {src: dict(c) for src, c in self.files.items()},
            "skipped": list(self.skipped),
            "totals": self.totals(),
        }


def iter_documents(
    inputs: list[str | Path], text_field: str = "text", stats: ReadStats | None = None
) -> Iterator[Document]:
    """Yield the non-empty documents of ``inputs`` (files or directories) in a deterministic order.

    Raises ``FileNotFoundError`` at call time if an input path does not exist; bad data never raises.
    """
    if isinstance(inputs, str | Path):
        inputs = [inputs]  # a lone path is an easy mistake; iterating its characters would be a confusing one
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
    return _iter_documents(paths, text_field, stats if stats is not None else ReadStats())


def _iter_documents(paths: list[Path], text_field: str, stats: ReadStats) -> Iterator[Document]:
    for path in paths:
        files = _list_directory(path, stats) if path.is_dir() else [path]
        for file in files:
            name = file.name.lower()
            if name.endswith(JSONL_SUFFIXES):
                yield from _read_jsonl(file, text_field, stats)
            else:
                yield from _read_text_file(file, stats)


def _list_directory(root: Path, stats: ReadStats) -> list[Path]:
    found = []
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue  # hidden files and folders (.git, .DS_Store) are never corpus text
        name = file.name.lower()
        if name.endswith(DIRECTORY_SUFFIXES) or "." not in name:
            found.append(file)
        else:
            stats.skipped.append(str(file))
    return found


def _open(path: Path) -> IO[bytes]:
    # Sniff the gzip magic rather than trusting the name, so a mislabelled file is still read correctly.
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


class _LineLengthTracker:
    """Counts lines longer than VERY_LONG_LINE_BYTES while a file streams by in chunks no larger than that.

    A line that long cannot fit between two newlines of one chunk, so only the run of bytes without a newline
    across chunk edges has to be tracked: linear time, constant memory.
    """

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        self.run = 0

    def feed(self, chunk: bytes) -> None:
        first = chunk.find(b"\n")
        if first < 0:
            self.run += len(chunk)
            return
        self._check(self.run + first)
        self.run = len(chunk) - chunk.rfind(b"\n") - 1

    def finish(self) -> None:
        self._check(self.run)

    def _check(self, length: int) -> None:
        if length > VERY_LONG_LINE_BYTES:
            self.counters["very_long_lines"] += 1


def _read_text_file(path: Path, stats: ReadStats) -> Iterator[Document]:
    source = str(path)
    counters = stats.file(source)
    chunks: list[bytes] = []
    lines = _LineLengthTracker(counters)
    truncated = False
    try:
        with _open(path) as f:
            # read1, not read: when a gzip stream is cut short, GzipFile.read drops the data it decompressed in
            # that call before raising EOFError, while read1 returns it and raises only on the next call.
            while chunk := f.read1(_READ_CHUNK_BYTES):
                lines.feed(chunk)
                chunks.append(chunk)
    except EOFError:  # gzip stream cut short: keep what was decompressed
        counters["truncated_gzip"] += 1
        truncated = True
    except (gzip.BadGzipFile, zlib.error):
        counters["corrupt_gzip"] += 1
        truncated = True
    except OSError:
        counters["read_errors"] += 1
        return
    lines.finish()
    data = b"".join(chunks)
    del chunks
    if truncated:
        data = _trim_partial_utf8(data)
    counters["bytes"] += len(data)
    text = _decode(data, counters)
    del data
    yield from _emit(source, 0, text, counters)


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    source = str(path)
    counters = stats.file(source)
    try:
        with _open(path) as f:
            for index, raw in enumerate(f):
                counters["bytes"] += len(raw)
                if len(raw) > VERY_LONG_LINE_BYTES:
                    counters["very_long_lines"] += 1
                line = _decode(raw, counters)
                if not line or line.isspace():
                    continue  # blank lines (often a trailing one) are layout, not documents
                text = _parse_json_text(line, text_field, counters)
                if text is not None:
                    yield from _emit(source, index, text, counters)
    except EOFError:  # the partial last line is lost with the exception, which is what we want
        counters["truncated_gzip"] += 1
    except (gzip.BadGzipFile, zlib.error):
        counters["corrupt_gzip"] += 1
    except OSError:
        counters["read_errors"] += 1


def _parse_json_text(line: str, text_field: str, counters: dict[str, int]) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        counters["malformed_json"] += 1
        return None
    if not isinstance(record, dict):
        counters["malformed_json"] += 1  # valid JSON, but a bare value or list has no text field to read
        return None
    if text_field not in record:
        counters["missing_text_field"] += 1
        return None
    text = record[text_field]
    if not isinstance(text, str):
        counters["non_string_text"] += 1
        return None
    if _JSON_SURROGATE.search(line):
        fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if fixed != text:
            counters["invalid_utf8"] += 1
            text = fixed
    return text


def _decode(data: bytes, counters: dict[str, int]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        counters["invalid_utf8"] += 1
        return data.decode("utf-8", errors="replace")


def _trim_partial_utf8(data: bytes) -> bytes:
    """Drop an incomplete multi-byte character at the very end (where a truncated stream stops)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        needed = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return data[:-back] if needed > back else data
    return data


def _emit(source: str, index: int, text: str, counters: dict[str, int]) -> Iterator[Document]:
    text = normalize_text(text)
    if ("GUTENBERG" in text or "Gutenberg" in text or "SMALL PRINT" in text) and (
        stripped := strip_gutenberg(text)
    ) is not None:
        text = stripped
        counters["gutenberg_stripped"] += 1
    if not text or text.isspace():
        counters["empty_documents"] += 1
        return
    counters["documents"] += 1
    yield Document(source, index, text)


def normalize_text(text: str) -> str:
    """Unify line endings to LF and drop a leading byte-order mark."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def strip_gutenberg(text: str) -> str | None:
    """Return the book without the Project Gutenberg header, credits and licence footer, or None if no markers."""
    # Some files repeat the start marker after a title block; the last one is where the book begins.
    start_match = None
    for start_match in _PG_START.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    start = start_match.end() if start_match else 0
    end_match = _PG_END.search(text, start)
    if start_match is None and end_match is None:
        return None
    body = text[start : end_match.start() if end_match else len(text)]
    if start_match:
        for _ in range(2):  # a text-file credit is often followed by an HTML-file credit
            body = _PG_CREDITS.sub("", body, count=1)
    return body.strip("\n") + "\n"
