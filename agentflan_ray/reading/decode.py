"""Stream raw records out of JSON, JSONL and Parquet files without loading whole files.

Every unit read from a file comes out as a ``RawRecord``: either a parsed value, or an ``error``
(a quarantine reason) with as much of the offending text as is useful, so no input makes a read task
raise. A bad unit is one record and reading goes on after it: a JSONL line, a JSON array item that
does not decode, a value over ``max_record_bytes`` (never held whole), a Parquet row. What cannot be
resynchronised (a truncated JSON file, binary data, a compressed file, a bare token that is not JSON)
yields one error record and the file is finished. JSON files are streamed by ``json_values``.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator

import pyarrow.parquet as pq

from agentflan_ray.reading.json_values import read_json_values
from agentflan_ray.reading.jsontext import loads
from agentflan_ray.reading.plan import FileRange
from agentflan_ray.reading.raw import CHUNK, PREVIEW, RawRecord, binary_signature, preview_bytes
from agentflan_ray.records import RecordError
from agentflan_ray.storage import filesystem

__all__ = ["PREVIEW", "RawRecord", "iter_raw_records", "read_json_values", "read_jsonl_range", "read_parquet_rows"]
PARQUET_BATCH = 512


def read_jsonl_range(
    stream, name: str, start: int, end: int | None, max_record_bytes: int
) -> Iterator[RawRecord]:
    """Lines whose first byte lies in ``[start, end)``; ``stream`` is a seekable binary file."""
    stream.seek(0)
    binary = binary_signature(stream.read(4))
    if binary:  # one row for the file, from the range that starts it
        if start == 0:
            yield RawRecord(None, name, "not_utf8", f"{binary}, not JSON lines")
        return
    position = start
    stream.seek(max(start - 1, 0))
    # A line starting exactly at `start` belongs to us; otherwise skip the partial line.
    if start > 0 and stream.read(1) != b"\n":
        position = _skip_line(stream, start, end)
    lines = 0
    while end is None or position < end:
        raw, length, too_long = _read_line(stream, max_record_bytes)
        if not length:
            break
        where = f"{name}@{position}"
        if position == 0:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        position += length
        if too_long:
            lines += 1
            yield RawRecord(None, where, "record_too_large",
                            f"line of {length} bytes exceeds max_record_bytes={max_record_bytes}", preview_bytes(raw), length)
        elif raw.strip():
            lines += 1
            yield _decode_line(raw, where)
    if lines == 0 and start == 0 and end is None:
        yield RawRecord(None, name, "empty_file", "no line holds anything but whitespace")


def _decode_line(raw: bytes, where: str) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(None, where, "not_utf8", str(exc), preview_bytes(raw), len(raw))
    try:
        return RawRecord(loads(text), where, size=len(raw))
    except RecordError as exc:
        return RawRecord(None, where, exc.reason, exc.detail, text[:PREVIEW], len(raw))


def _read_line(stream, limit: int) -> tuple[bytes, int, bool]:
    """One line and its length; a line longer than ``limit`` is consumed keeping only its start."""
    line = stream.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, len(line), False
    head, length = line[:PREVIEW], len(line)
    del line
    while True:
        piece = stream.readline(CHUNK)
        length += len(piece)
        if not piece or piece.endswith(b"\n"):
            return head, length, True


def _skip_line(stream, position: int, end: int | None) -> int:
    """Skip the rest of a line that began before ``position``, a chunk at a time, and return where the
    next line starts; stop early once that can only be at or past ``end`` (not this range's line)."""
    while end is None or position < end:
        piece = stream.readline(CHUNK)
        position += len(piece)
        if not piece or piece.endswith(b"\n"):
            break
    return position


def read_parquet_rows(stream, name: str, max_record_bytes: int) -> Iterator[RawRecord]:
    """Rows of a Parquet file. A row over ``max_record_bytes`` (its Arrow size) is never turned into
    Python objects; a row that cannot be converted is one error record; a file that cannot be read
    on is one error record for the rest of it."""
    index = 0
    try:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=PARQUET_BATCH):
            yield from _batch_rows(batch, name, index, max_record_bytes)
            index += batch.num_rows
    except Exception as exc:  # noqa: BLE001 - an unreadable Parquet file is quarantined, not raised
        yield RawRecord(None, name if index == 0 else f"{name}#{index}", "invalid_parquet",
                        f"{type(exc).__name__}: {exc}")


def _batch_rows(batch, name: str, first: int, limit: int) -> Iterator[RawRecord]:
    rows = None
    if batch.nbytes <= limit:  # no row can be over the limit: convert the batch at once
        try:
            rows = batch.to_pylist()
        except Exception:  # noqa: BLE001 - some row does not convert: find it below, row by row
            rows = None
    for i in range(batch.num_rows):
        where = f"{name}#{first + i}"
        if rows is not None:
            yield RawRecord(rows[i], where)
            continue
        row = batch.slice(i, 1)
        if row.nbytes > limit:
            yield RawRecord(None, where, "record_too_large",
                            f"row of {row.nbytes} bytes exceeds max_record_bytes={limit}", size=row.nbytes)
            continue
        try:
            yield RawRecord(row.to_pylist()[0], where, size=row.nbytes)
        except UnicodeDecodeError as exc:
            yield RawRecord(None, where, "not_utf8", str(exc), size=row.nbytes)
        except Exception as exc:  # noqa: BLE001 - a value Python cannot hold (a date out of range, ...)
            yield RawRecord(None, where, "invalid_parquet", f"{type(exc).__name__}: {exc}", size=row.nbytes)


def iter_raw_records(piece: FileRange, config) -> Iterator[RawRecord]:
    """Every unit of one file piece, opened through local disk or S3; a piece the listing already
    found unreadable is one error record and is never opened."""
    if piece.problem:
        yield RawRecord(None, piece.name, piece.problem, piece.detail)
        return
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
            yield from read_parquet_rows(stream, piece.name, config.max_record_bytes)
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
