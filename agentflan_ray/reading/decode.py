"""Stream raw records out of JSON, JSONL and Parquet files without loading whole files.

Every unit read from a file comes out as a ``RawRecord``: either a parsed value, or an ``error``
(a quarantine reason) with as much of the offending text as is useful. A truncated JSON file, a
binary file or an over-long line therefore never raises: it yields one error record and the file
is finished.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from agentflan_ray.reading.plan import FileRange
from agentflan_ray.storage import filesystem

CHUNK = 1 << 20
PREVIEW = 2000
DECODER = json.JSONDecoder()
WHITESPACE = " \t\n\r\ufeff"


@dataclass
class RawRecord:
    value: Any
    where: str  # "path#index" or "path@byte"
    error: str = ""
    detail: str = ""
    preview: str = ""
    size: int = 0


def read_jsonl_range(
    stream, name: str, start: int, end: int | None, max_record_bytes: int
) -> Iterator[RawRecord]:
    """Lines whose first byte lies in ``[start, end)``; ``stream`` is a seekable binary file."""
    position = start
    if start > 0:
        stream.seek(start - 1)
        # A line starting exactly at `start` belongs to us; otherwise skip the partial line.
        position = start + len(stream.readline()) if stream.read(1) != b"\n" else start
    while end is None or position < end:
        line = _read_line(stream, max_record_bytes)
        if line is None:
            return
        raw, length = line
        where = f"{name}@{position}"
        position += length
        if raw is _TOO_LONG:
            yield RawRecord(None, where, "record_too_large", f"line of {length} bytes", size=length)
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRecord(None, where, "not_utf8", str(exc), _preview(raw), len(raw))
            continue
        try:
            yield RawRecord(json.loads(text), where, size=len(raw))
        except json.JSONDecodeError as exc:
            yield RawRecord(None, where, "invalid_json", str(exc), text[:PREVIEW], len(raw))


_TOO_LONG = object()


def _read_line(stream, limit: int):
    """Read one line; a line longer than ``limit`` is consumed without keeping it."""
    line = stream.readline(limit + 1)
    if not line:
        return None
    if len(line) <= limit or line.endswith(b"\n"):
        return line, len(line)
    length = len(line)
    while not line.endswith(b"\n"):
        line = stream.readline(CHUNK)
        if not line:
            break
        length += len(line)
    return _TOO_LONG, length


def read_json_values(stream, name: str, max_record_bytes: int) -> Iterator[RawRecord]:
    """Values of a JSON file: the items of a top-level array, or each top-level value in turn
    (one object, or concatenated/newline-delimited objects)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, index, in_array, first = "", 0, False, 0, False, True
    # Parsing gives up (and quarantines the rest of the file) past this many bytes in one value.
    hard_limit = max(4 * max_record_bytes, 64 << 20)

    def fill(want: int) -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = stream.read(max(CHUNK, want))
        if not data:
            eof = True
            buf += decoder.decode(b"", final=True)
            return False
        buf = buf[pos:] + decoder.decode(data)
        pos = 0
        return True

    try:
        while True:
            while True:
                while pos < len(buf) and buf[pos] in WHITESPACE:
                    pos += 1
                if pos < len(buf) or not fill(CHUNK):
                    break
            if pos >= len(buf):
                if in_array:
                    yield RawRecord(None, f"{name}#{index}", "invalid_json", "truncated: array not closed")
                return
            char = buf[pos]
            if first and char == "[":
                in_array, first = True, False
                pos += 1
                continue
            first = False
            if in_array and char == ",":
                pos += 1
                continue
            if in_array and char == "]":
                in_array = False
                pos += 1
                continue
            while True:
                try:
                    value, end = DECODER.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if len(buf) - pos > hard_limit:
                        yield RawRecord(None, f"{name}#{index}", "record_too_large",
                                        f"value over {hard_limit} bytes; rest of file skipped")
                        return
                    if not fill(len(buf) - pos):
                        yield RawRecord(None, f"{name}#{index}", "invalid_json", str(exc),
                                        buf[pos : pos + PREVIEW], len(buf) - pos)
                        return
            start, pos = pos, end
            size = end - start
            if size > max_record_bytes:
                yield RawRecord(None, f"{name}#{index}", "record_too_large",
                                f"record of {size} characters exceeds max_record_bytes={max_record_bytes}",
                                buf[start : start + PREVIEW], size)
            else:
                yield RawRecord(value, f"{name}#{index}", size=size)
            index += 1
    except UnicodeDecodeError as exc:
        yield RawRecord(None, f"{name}#{index}", "not_utf8", f"not UTF-8 text: {exc.reason} at byte {exc.start}")


def read_parquet_rows(stream, name: str) -> Iterator[RawRecord]:
    try:
        parquet = pq.ParquetFile(stream)
        index = 0
        for batch in parquet.iter_batches(batch_size=512):
            for row in batch.to_pylist():
                yield RawRecord(row, f"{name}#{index}")
                index += 1
    except Exception as exc:  # noqa: BLE001 - any unreadable Parquet file is quarantined whole
        yield RawRecord(None, name, "invalid_parquet", f"{type(exc).__name__}: {exc}")


def _preview(raw: bytes) -> str:
    return raw[:PREVIEW].decode("utf-8", errors="replace")


def iter_raw_records(piece: FileRange, config) -> Iterator[RawRecord]:
    """Every unit of one file piece, opened through local disk or S3."""
    fs, _ = filesystem(piece.uri, config.storage)
    try:
        stream = fs.open_input_file(piece.path)
    except OSError as exc:
        yield RawRecord(None, piece.name, "unreadable_file", str(exc))
        return
    with stream:
        if piece.kind == "jsonl":
            stream = buffered(stream)
            yield from read_jsonl_range(stream, piece.name, piece.start, piece.end, config.max_record_bytes)
        elif piece.kind == "parquet":
            yield from read_parquet_rows(stream, piece.name)
        else:
            yield from read_json_values(stream, piece.name, config.max_record_bytes)


class _RawNative(io.RawIOBase):
    """A pyarrow file as a Python raw stream, so ``io.BufferedReader`` gives us ``readline(limit)``."""

    def __init__(self, native):
        self.native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.native.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.native.seek(offset, whence)

    def tell(self) -> int:
        return self.native.tell()


def buffered(native) -> io.BufferedReader:
    return io.BufferedReader(_RawNative(native), buffer_size=1 << 20)
