"""JSON files streamed value by value: the items of a top-level array, or each top-level value in
turn (one object, or concatenated objects).

The C decoder reads each value from a buffer of decoded text, and more is read while a value looks cut
off by the buffer's end. A value that does not decode is measured by ``ValueEnd`` instead, so reading
resumes after it; one that grows past ``max_record_bytes`` streams past a chunk at a time and is
never held whole. Bytes that are not UTF-8 spoil only the value they are in.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator

from agentflan_ray.reading.jsontext import (
    DECODER,
    NON_WHITESPACE,
    RAW_SURROGATE,
    ValueEnd,
    check_value,
    decode_at,
    printable,
)
from agentflan_ray.reading.raw import CHUNK, PREVIEW, RawRecord, binary_signature
from agentflan_ray.records import RecordError


class _Text:
    """The text of a binary stream, decoded a chunk at a time; ``text[pos:]`` is not consumed yet.

    Bytes that are not UTF-8 enter the text as lone surrogates (``surrogateescape``) and set
    ``bad_bytes``, so one bad byte spoils only the value it is in.
    """

    def __init__(self, stream):
        self.stream, self.text, self.pos, self.eof, self.bad_bytes = stream, "", 0, False, False
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.head = b""

    def fill(self, size: int = CHUNK, keep: bool = True) -> bool:
        """Append up to ``size`` more bytes, dropping what was consumed (everything unless ``keep``);
        False once nothing more comes."""
        if self.eof:
            return False
        data = self.stream.read(size)
        self.head = self.head or data[:4]
        self.eof = not data
        more = self._decode(data)
        self.text = (self.text[self.pos :] if keep else "") + more
        self.pos = 0
        return bool(data or more)

    def grow(self, limit: int) -> bool:
        """Read more for the value at ``pos``: double what is buffered, but not much past ``limit``."""
        buffered = len(self.text) - self.pos
        return self.fill(max(CHUNK, min(buffered, limit - buffered)))

    def compact(self) -> None:
        self.text, self.pos = self.text[self.pos :], 0

    def next_char(self) -> str:
        """Move past whitespace; the next character, or "" at the end of the input."""
        while True:
            match = NON_WHITESPACE.search(self.text, self.pos)
            if match:
                self.pos = match.start()
                return self.text[self.pos]
            self.pos = len(self.text)
            if not self.fill(keep=False):
                return ""

    def _decode(self, data: bytes) -> str:
        try:
            return self.decoder.decode(data, final=not data)
        except UnicodeDecodeError:  # the decoder keeps its state: decode the same bytes again
            self.bad_bytes = True
            self.decoder.errors = "surrogateescape"
            try:
                return self.decoder.decode(data, final=not data)
            finally:
                self.decoder.errors = "strict"

    def size_over(self, start: int, end: int, limit: int) -> int:
        """The UTF-8 size of ``text[start:end]`` when it is over ``limit``, else 0. Encoding to count
        happens only for non-ASCII text of over ``limit / 4`` characters."""
        if (end - start) * 4 <= limit:
            return 0
        size = end - start if self.text.isascii() else self.utf8_len(start, end)
        return size if size > limit else 0

    def utf8_len(self, start: int, end: int) -> int:
        if self.text.isascii():
            return end - start
        return len(self.text[start:end].encode("utf-8", "surrogatepass"))

    def reason(self, start: int, end: int) -> str:
        """Why ``text[start:end]`` does not decode, as far as its bytes tell."""
        return "not_utf8" if self.bad_bytes and RAW_SURROGATE.search(self.text, start, end) else "invalid_json"


def read_json_values(stream, name: str, max_record_bytes: int) -> Iterator[RawRecord]:
    """Values of a JSON file: the items of a top-level array, or each top-level value in turn
    (one object, or concatenated/newline-delimited objects)."""
    text = _Text(stream)
    text.fill()
    binary = binary_signature(text.head)
    if binary:
        yield RawRecord(None, name, "not_utf8", f"{binary}, not JSON text")
        return
    index, in_array, first = 0, False, True
    while True:
        char = text.next_char()
        if not char:
            if in_array:
                yield RawRecord(None, f"{name}#{index}", "invalid_json", "truncated: array not closed")
            elif first:
                yield RawRecord(None, name, "empty_file", "only whitespace")
            return
        if first and char == "[":
            in_array, first = True, False
            text.pos += 1
            continue
        first = False
        if in_array and char in ",]":
            in_array = char == ","
            text.pos += 1
            continue
        record, go_on = _next_value(text, f"{name}#{index}", max_record_bytes, in_array)
        yield record
        index += 1
        if not go_on:
            return


def _next_value(text: _Text, where: str, limit: int, in_array: bool) -> tuple[RawRecord, bool]:
    """The value at ``text.pos`` and whether reading can go on after it. The C decoder is tried on
    what is buffered, with more read while the value looks cut off by the buffer's end; whatever
    else goes wrong is left to ``_scan_value``."""
    while True:
        start = text.pos
        try:
            value, end = DECODER.raw_decode(text.text, start)
            if end < len(text.text) or text.eof:  # else it may be a number the buffer cut short
                text.pos = end
                return _checked(text, value, where, start, end, limit), True
        except json.JSONDecodeError as exc:
            cut_off = exc.pos >= len(text.text) or exc.msg.startswith("Unterminated string")
            if not cut_off:
                break
        except (ValueError, RecursionError):
            break
        if text.size_over(start, len(text.text), limit) or not text.grow(limit):
            break
    return _scan_value(text, where, limit, in_array)


def _checked(text: _Text, value, where: str, start: int, end: int, limit: int) -> RawRecord:
    """A decoded value, unless it is too large, holds undecodable bytes, or is too deep."""
    size = end - start
    try:
        if over := text.size_over(start, end, limit):
            size = over
            raise RecordError("record_too_large", f"record of {over} bytes exceeds max_record_bytes={limit}")
        if text.bad_bytes and RAW_SURROGATE.search(text.text, start, end):
            raise RecordError("not_utf8", "bytes that are not UTF-8")
        check_value(value, text.text, start, end)
    except RecordError as exc:
        preview = printable(text.text[start : min(end, start + PREVIEW)])
        return RawRecord(None, where, exc.reason, exc.detail, preview, size)
    return RawRecord(value, where, size=size)


def _scan_value(text: _Text, where: str, limit: int, in_array: bool) -> tuple[RawRecord, bool]:
    """Find where the value ends without decoding it, then decode it once to name its problem."""
    text.compact()
    scanner, scanned = ValueEnd(), 0
    while (end := scanner.feed(text.text, scanned)) is None:
        scanned = len(text.text)
        if text.size_over(0, scanned, limit):
            return _skip(text, scanner, where, limit, in_array)
        if not text.grow(limit):
            if not scanner.ends_at_eof():
                return RawRecord(None, where, text.reason(0, scanned), "truncated: the file ends inside this value",
                                 printable(text.text[:PREVIEW]), scanned), False
            end = len(text.text)
            break
    text.pos = end
    go_on = in_array or not scanner.token  # past a bare token that is not JSON, nothing is reliable
    preview = printable(text.text[: min(end, PREVIEW)])
    if over := text.size_over(0, end, limit):
        return RawRecord(None, where, "record_too_large",
                         f"record of {over} bytes exceeds max_record_bytes={limit}", preview, over), go_on
    if text.reason(0, end) == "not_utf8":
        return RawRecord(None, where, "not_utf8", "bytes that are not UTF-8", preview, end), go_on
    try:
        value, stop = decode_at(text.text, 0)
    except RecordError as exc:
        return RawRecord(None, where, exc.reason, exc.detail, preview, end), go_on
    if stop != end:
        return RawRecord(None, where, "invalid_json", f"unexpected text after the value at character {stop}",
                         preview, end), go_on
    return RawRecord(value, where, size=end), True


def _skip(text: _Text, scanner: ValueEnd, where: str, limit: int, in_array: bool) -> tuple[RawRecord, bool]:
    """Stream past the rest of a value that is already over ``limit``, holding a chunk at a time."""
    preview, size = printable(text.text[:PREVIEW]), text.utf8_len(0, len(text.text))
    while text.fill(CHUNK, keep=False):
        end = scanner.feed(text.text, 0)
        if end is not None:
            text.pos = end
            size += text.utf8_len(0, end)
            return RawRecord(None, where, "record_too_large", f"record of {size} bytes exceeds max_record_bytes={limit}",
                             preview, size), in_array or not scanner.token
        size += text.utf8_len(0, len(text.text))
    return RawRecord(None, where, "record_too_large",
                     f"a value of over {size} bytes (max_record_bytes={limit}) that the file cuts off", preview, size), False
