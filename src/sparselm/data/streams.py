"""Byte streams for the document readers: transparent gzip/zstd decompression, length-bounded line reading, and
what a failing stream means (``stream_error``)."""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO, NamedTuple

SNIPPET_BYTES = 1200  # raw head kept of an over-long line: enough for a 300-character snippet
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _ZstdReader(io.RawIOBase):
    """zstd decompression that notices a truncated stream (python-zstandard's stream_reader just stops early)."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._obj = self._new()
        self._buffer = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, out: bytearray | memoryview) -> int:
        while not self._buffer:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise EOFError("zstd stream ended before the end of its frame")
                return 0
            while chunk:
                self._started = True
                self._buffer += self._obj.decompress(chunk)
                chunk = b""
                if self._obj.eof and self._obj.unused_data:  # concatenated frames
                    chunk, self._obj = self._obj.unused_data, self._new()
        n = min(len(out), len(self._buffer))
        out[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def decompressed(raw: IO[bytes]) -> IO[bytes]:
    """``raw`` decompressed when it starts with gzip or zstd magic bytes (a file's name is not trusted), else
    ``raw`` buffered; either way a stream with ``peek``, ``read1`` and ``readline``."""
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    magic = buffered.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        # GzipFile is already buffered (peek, readline). Wrapping it in another BufferedReader would be wrong: a
        # large read on a truncated stream raises EOFError and drops the lines decompressed before the cut.
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        return io.BufferedReader(_ZstdReader(buffered), 1 << 16)
    return buffered


class Line(NamedTuple):
    data: bytes | None  # the line, newline included; None when over the limit and not kept
    length: int  # its length in bytes, newline included
    head: bytes  # its start (at least SNIPPET_BYTES bytes of it), for a reject's snippet
    too_long: bool  # longer than the limit, newline excluded


def bounded_lines(stream: IO[bytes], max_line: int, keep_long: bool = False) -> Iterator[Line]:
    """The lines of ``stream``. A line over ``max_line`` bytes is read in pieces and dropped (only its head is kept),
    so it costs ``max_line`` of memory, never its length; with ``keep_long`` it is returned whole."""
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            return
        if len(line) <= max_line or line.endswith(b"\n"):
            yield Line(line, len(line), line, False)
            continue
        length, head = len(line), line[:SNIPPET_BYTES]
        pieces = [line] if keep_long else []
        while line and not line.endswith(b"\n"):
            line = stream.readline(1 << 20)  # the rest of the over-long line
            length += len(line)
            if keep_long:
                pieces.append(line)
        yield Line(b"".join(pieces) if keep_long else None, length, head, True)


def stream_error(exc: BaseException) -> str | None:
    """The reject reason for an exception raised while reading a stream, or None if it is not a stream problem (a
    bug, which should surface)."""
    if isinstance(exc, EOFError):
        return "truncated_zstd" if "zstd" in str(exc) else "truncated_gzip"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return "corrupt_gzip"
    if isinstance(exc, zipfile.BadZipFile):
        return "corrupt_zip"
    if type(exc).__name__ == "ZstdError":
        return "corrupt_zstd"
    if isinstance(exc, OSError):
        return "read_error"
    return None
