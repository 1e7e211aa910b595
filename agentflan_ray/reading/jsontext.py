"""Strict JSON for untrusted text: decode one value with a quarantine reason for every way it can be
bad, and find where a value ends without decoding (or keeping) it.

Python's ``json`` module accepts ``NaN`` and ``Infinity``, hands back lone surrogates from escapes like
``"\\ud800"`` (which no Parquet file can store), raises ``RecursionError`` on deep nesting and a bare
``ValueError`` on integers of more than 4300 digits. Here each of these is a ``RecordError``:
``invalid_json``, ``not_utf8`` or ``too_deep``. How deep a value may nest is the decoder's own limit
(Python's recursion limit, about 1,000 levels; deeper is ``too_deep``); code downstream that recurses
over a value (previews, ``json.dumps`` of tool schemas) has the same limit, and a record that reaches
it there is quarantined ``too_deep`` too (generate.process_raw_record). Duplicate keys
keep their last value, as everywhere else in Python and JavaScript.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from agentflan_ray.records import RecordError

MAX_NUMBER_CHARS = 1000
NON_WHITESPACE = re.compile("[^ \t\n\r\ufeff]")  # JSON's whitespace, and a byte order mark
# Undecodable input bytes reach the text as lone surrogates (errors="surrogateescape").
RAW_SURROGATE = re.compile("[\ud800-\udfff]")
ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class _NotJson(ValueError):
    pass


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise _NotJson(f"a number of {len(text)} characters")
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise _NotJson(f"{text[:40]} is out of range")
        return value

    return parse


def _constant(name: str):
    raise _NotJson(f"{name} is not JSON")


# Integers keep the C parser (a hook would cost a Python call per number): one longer than Python
# allows (4,300 digits) is a ValueError, caught below.
DECODER = json.JSONDecoder(parse_float=_number(float), parse_constant=_constant)


def decode_at(text: str, start: int) -> tuple[Any, int]:
    """The value starting at ``text[start]`` and where it ends; every failure is a ``RecordError``."""
    try:
        value, end = DECODER.raw_decode(text, start)
    except RecursionError:
        raise RecordError("too_deep", "nested deeper than the JSON decoder's stack allows") from None
    except _NotJson as exc:
        raise RecordError("invalid_json", str(exc)) from None
    except json.JSONDecodeError as exc:
        raise RecordError("invalid_json", f"{exc.msg} (character {exc.pos - start})") from None
    except ValueError as exc:  # int() refusing a huge literal (sys.get_int_max_str_digits)
        raise RecordError("invalid_json", str(exc)[:200]) from None
    check_value(value, text, start, end)
    return value, end


def loads(text: str) -> Any:
    """The one value ``text`` holds (whitespace around it is fine)."""
    first = NON_WHITESPACE.search(text)
    value, end = decode_at(text, first.start() if first else len(text))
    if NON_WHITESPACE.search(text, end):
        raise RecordError("invalid_json", f"extra data at character {end}")
    return value


def check_value(value, text: str, start: int, end: int) -> None:
    """Refuse a decoded value holding a lone surrogate, which only an escape in ``text[start:end]``
    can have produced: the value is walked only when the text holds such an escape."""
    if ESCAPED_SURROGATE.search(text, start, end) is None:
        return
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and RAW_SURROGATE.search(node):
            raise RecordError("not_utf8", f"a lone surrogate escape in {printable(node[:80])!r}")


def printable(text: str) -> str:
    """``text`` with each surrogate (an undecodable byte, a lone escape) as U+FFFD, so it can be stored."""
    return text if text.isascii() else RAW_SURROGATE.sub("\ufffd", text)


class ValueEnd:
    """Finds where one JSON value ends, fed its text piece by piece; keeps counters, never the text.

    It knows only strings, brackets and bare tokens, so it finds the end of invalid values too (the
    decoder then names the problem) and takes any depth without recursion. The regular expressions
    repeat a bounded number of times per call: an unbounded repeat keeps backtracking state for
    every escape of a huge string.
    """

    # A whole short string, a bracket, or the quote opening a string this call cannot take in whole.
    STEP = re.compile(r'"[^"\\]*(?:\\.[^"\\]*){0,16}"|[\[\]{}"]', re.S)
    STRING_PART = re.compile(r'[^"\\]*(?:\\.[^"\\]*){0,4096}', re.S)
    TOKEN_END = re.compile(r'[\s,\[\]{}"]')

    def __init__(self):
        self.started = self.token = self.in_string = self.escaped = False
        self.depth = 0

    def feed(self, text: str, i: int) -> int | None:
        """Scan ``text[i:]``; the index just past the value, or None when it goes on after ``text``."""
        if not self.started:
            self.started = True
            first = text[i]
            self.in_string, self.token = first == '"', first not in '"[{'
            self.depth = int(first in "[{")
            i += 1
        if self.token:
            match = self.TOKEN_END.search(text, i)
            return match.start() if match else None
        n = len(text)
        while i < n:
            if self.in_string:
                i = self._string(text, i)
                if i is None:
                    return None
                if self.depth == 0:
                    return i
                continue
            match = self.STEP.search(text, i)
            if match is None:
                return None
            start, i = match.span()
            char = text[start]
            if char == '"':
                self.in_string = i - start == 1  # else the whole string was matched
            elif char in "[{":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return i
        return None

    def _string(self, text: str, i: int) -> int | None:
        """Inside a string: the index past its closing quote, or None when it goes on after ``text``."""
        n = len(text)
        while True:
            if self.escaped:
                self.escaped, i = False, i + 1
            if i >= n:
                return None
            i = self.STRING_PART.match(text, i).end()
            if i == n:
                return None
            if text[i] == '"':
                self.in_string = False
                return i + 1
            if i == n - 1:  # a backslash last: what it escapes is in the next piece
                self.escaped = True
                return None
            # else the repeat bound stopped at a backslash: go on from there

    def ends_at_eof(self) -> bool:
        """A bare token (number, literal, garbage) ends where the input does; anything else is cut."""
        return self.token
