"""Local paths and ``s3://`` URIs behind one pyarrow filesystem interface.

S3 is reached exactly as in production: pyarrow's native S3 client with the endpoint from config or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto's server, or nothing for AWS itself) and
credentials from the standard AWS variables. Nothing here ever prints a credential.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass
class StorageConfig:
    """Where s3:// paths go. Credentials come from the usual AWS variables, never from here."""

    endpoint_url: str = ""
    region: str = "us-east-1"


GLOB_CHARS = re.compile(r"[*?\[]")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint(storage: StorageConfig) -> str:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")


def filesystem(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Return ``(fs, path)`` where ``path`` is what ``fs`` understands (no scheme)."""
    if is_s3(uri):
        endpoint = s3_endpoint(storage)
        kwargs = {"region": os.environ.get("AWS_REGION") or storage.region}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            if not host:
                scheme, host = "https", endpoint
            kwargs.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kwargs), fs_path(uri)
    return pafs.LocalFileSystem(), fs_path(uri)


def fs_path(uri: str) -> str:
    """The path ``filesystem(uri)``'s filesystem understands: no scheme, local paths absolute."""
    if is_s3(uri):
        return uri[len("s3://"):].rstrip("/")
    return str(Path(uri).expanduser().absolute())


def sha256(uri: str, storage: StorageConfig) -> str:
    """The sha256 of a file's bytes, local or ``s3://``, read in 1 MiB pieces."""
    fs, path = filesystem(uri, storage)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def glob_to_regex(pattern: str) -> re.Pattern:
    """Translate a glob with ``**`` (any depth), ``*`` and ``?`` to a regex over ``/`` paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def expand(uri: str, storage: StorageConfig) -> list[tuple[str, int, str]]:
    """List the files a path, directory or glob names: ``(fs_path, size, relative_name)``, sorted.

    ``relative_name`` is relative to the part of the pattern before its first glob character, so
    the same data read from disk or from S3 gets the same record ids.
    """
    fs, path = filesystem(uri, storage)
    match = GLOB_CHARS.search(path)
    if match is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [(path, info.size, posixpath.basename(path))]
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {uri}")
        base, regex = path, None
    else:
        base = posixpath.dirname(path[: match.start()] + "x")
        regex = glob_to_regex(path)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    files = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        name = info.path.replace(os.sep, "/") if not is_s3(uri) else info.path
        if regex is not None and not regex.match(name):
            continue
        if posixpath.basename(name).startswith((".", "_")):
            continue
        files.append((info.path, info.size, posixpath.relpath(name, base.replace(os.sep, "/"))))
    return sorted(files)
