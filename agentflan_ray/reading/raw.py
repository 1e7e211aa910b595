"""The unit every decoder yields, and what the decoders share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHUNK = 1 << 20
PREVIEW = 2000
# Files that are certainly not JSON text, by their first bytes.
SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"PAR1", "a Parquet file"),
    (b"\xff\xfe", "UTF-16 text (little-endian byte order mark)"),
    (b"\xfe\xff", "UTF-16 text (big-endian byte order mark)"),
    (b"\x00\x00\xfe\xff", "UTF-32 text"),
)


@dataclass
class RawRecord:
    """One unit of a file: a decoded ``value``, or an ``error`` (a quarantine reason) with a detail
    and a preview of the offending text."""

    value: Any
    where: str  # "path#index" or "path@byte", or "path" for the whole file
    error: str = ""
    detail: str = ""
    preview: str = ""
    size: int = 0


def binary_signature(head: bytes) -> str:
    """What a file is when its first bytes say it is not JSON text, else ""."""
    return next((what for magic, what in SIGNATURES if head.startswith(magic)), "")


def preview_bytes(raw: bytes) -> str:
    return raw[:PREVIEW].decode("utf-8", errors="replace")
