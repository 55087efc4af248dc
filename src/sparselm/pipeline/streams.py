"""Byte streams for the source readers: transparent gzip/zstd decompression and length-bounded line reading."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from typing import IO

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
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    magic = buffered.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        # GzipFile is already buffered (peek, readline). Wrapping it in another BufferedReader would be wrong: a
        # large read on a truncated stream raises EOFError and drops the lines decompressed before the cut.
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        return io.BufferedReader(_ZstdReader(buffered), 1 << 16)
    return buffered


def bounded_lines(stream: IO[bytes], max_line: int) -> Iterator[tuple[bytes | None, int, bytes]]:
    """(line, length, head) per line; ``line`` is None when longer than ``max_line`` (then only its head is kept)."""
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            return
        if len(line) <= max_line or line.endswith(b"\n"):
            yield line, len(line), line
            continue
        length, head = len(line), line[:SNIPPET_BYTES]
        while line and not line.endswith(b"\n"):
            line = stream.readline(1 << 20)  # consume the rest of the over-long line without keeping it
            length += len(line)
        yield None, length, head
