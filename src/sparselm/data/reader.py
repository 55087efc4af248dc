"""Read training documents from text, JSONL and compressed inputs, counting bad data instead of failing on it.

This is ``sparselm prepare``'s (and the tokenizer trainer's) view of ``data.documents``, the reader it shares with the
data pipeline: files are found, every document is kept when it can be, and every problem is counted per input file
in ``ReadStats`` (reported in ``meta.json``). One corrupt line in a 20 GB crawl should cost one line, not the whole
run. Only a missing input path raises: that is a typo, not bad data.

Input kinds (decided by file name, case-insensitive; gzip and zstd are recognised by their magic bytes):

- ``.jsonl``, ``.ndjson``, ``.json.gz``, ``.jsonl.gz``, ``.jsonl.zst``...: one JSON object per line, the text in
  ``text_field``; one line = one document, streamed line by line.
- anything else given explicitly, and ``.txt``, ``.text``, ``.md``, ``.txt.gz``, ``.txt.zst`` or extension-less files
  found in directories: plain text, the whole file = one document.

Directories are walked recursively in sorted order, skipping hidden entries. Text is decoded as UTF-8 with
replacement characters, line endings become LF and Project Gutenberg boilerplate is stripped. A truncated gzip or
zstd file keeps what could be decompressed (complete lines only, for JSONL).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselm.data.documents import BLANK, JSONL_SUFFIXES, ReadPolicy, Record, is_jsonl, read_file, walk
from sparselm.data.gutenberg import book_text, normalize_text, strip_gutenberg

__all__ = ["COUNTERS", "Document", "ReadStats", "iter_documents", "normalize_text", "strip_gutenberg"]

DIRECTORY_SUFFIXES = (".txt", ".text", ".md", ".txt.gz", ".txt.zst", *JSONL_SUFFIXES)
# Lines longer than this are reported: they usually mean minified or binary data slipped into a text corpus.
VERY_LONG_LINE_BYTES = 1 << 20

# Counters kept for every input file (others appear when they happen, e.g. truncated_zstd). All but INFO_COUNTERS
# describe bad data and are worth a warning.
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
INFO_COUNTERS = ("documents", "bytes", "gutenberg_stripped")
_COUNTER_OF = {"read_error": "read_errors", "long_line": "very_long_lines"}  # record reason or note -> counter


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
        return [(src, k, n) for src, c in self.files.items() for k, n in c.items() if n and k not in INFO_COUNTERS]

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
    policy = ReadPolicy(text_field=text_field, invalid_utf8="replace", max_line_bytes=VERY_LONG_LINE_BYTES)
    for path in paths:
        for file in _list_directory(path, stats) if path.is_dir() else [path]:
            counters = stats.file(str(file))
            for record in read_file(file, "jsonl" if is_jsonl(file.name) else "text", policy):
                yield from _document(record, counters)


def _list_directory(root: Path, stats: ReadStats) -> list[Path]:
    found = []
    for file in walk(root):
        name = file.name.lower()
        if name.endswith(DIRECTORY_SUFFIXES) or "." not in name:
            found.append(file)
        else:
            stats.skipped.append(str(file))
    return found


def _document(record: Record, counters: dict[str, int]) -> Iterator[Document]:
    """Count what ``record`` says about its file; yield it as a Document unless it is a reject or empty."""
    counters["bytes"] += record.size
    for problem in (*record.notes, record.reason):
        if problem and problem != BLANK:
            key = _COUNTER_OF.get(problem, problem)
            counters[key] = counters.get(key, 0) + 1
    if record.text is None:
        return
    text, stripped = book_text(record.text)
    if stripped:
        counters["gutenberg_stripped"] += 1
    if not text or text.isspace():
        counters["empty_documents"] += 1
        return
    counters["documents"] += 1
    yield Document(record.source, max(record.line - 1, 0), text)
