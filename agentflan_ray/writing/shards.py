"""Parquet shards with deterministic names and bytes, for every job.

    <root>/<folder>/part-NNNNN.parquet

A writer buffers rows per folder and writes row groups of exactly ``row_group_rows`` rows (the last
one of a file may be shorter), so the same rows in the same order give the same bytes. Each job
knows its folders (generate: one per stream plus ``quarantine``; chat: ``responses`` and
``dead_letters``) and only ever writes, or removes, ``part-*.parquet`` files directly inside them.
Columns whose name starts with ``_`` are run-time bookkeeping and never written.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from agentflan_ray.records import QUARANTINE_SCHEMA, SAMPLE_SCHEMA
from agentflan_ray.storage import StorageConfig, filesystem

QUARANTINE = "quarantine"
PART = re.compile(r"^part-\d{5}\.parquet$")


def part_name(folder: str, index: int) -> str:
    return f"{folder}/part-{index:05d}.parquet"


def sample_schema(folder: str) -> pa.Schema:
    """generate's folders: every stream holds samples, ``quarantine`` the unusable records."""
    return QUARANTINE_SCHEMA if folder == QUARANTINE else SAMPLE_SCHEMA


class ShardWriter:
    """Rows -> ``<root>/<folder>/part-NNNNN.parquet``, starting at part ``first_part``; with
    ``rows_per_file`` a folder moves on to the next part number every that many rows."""

    def __init__(self, root: str, storage: StorageConfig, schema: Callable[[str], pa.Schema],
                 row_group_rows: int = 2000, first_part: int = 0, rows_per_file: int = 0):
        self.fs, self.root = filesystem(root, storage)
        self.schema, self.row_group_rows = schema, row_group_rows
        self.first_part, self.rows_per_file = first_part, rows_per_file
        self.buffers: dict[str, list[dict]] = {}
        self.writers: dict[str, tuple[str, pq.ParquetWriter]] = {}  # folder -> (relative path, writer)
        self.files: dict[str, int] = {}  # relative path -> rows written

    def add(self, folder: str, row: dict) -> None:
        buffer = self.buffers.setdefault(folder, [])
        buffer.append(row)
        if len(buffer) >= self.row_group_rows or (self.rows_per_file and self._file_full(folder, len(buffer))):
            self._flush(folder)

    def _file_full(self, folder: str, buffered: int) -> bool:
        current = self.writers.get(folder)
        return (self.files[current[0]] if current else 0) + buffered >= self.rows_per_file

    def _flush(self, folder: str) -> None:
        rows = self.buffers.get(folder)
        if not rows:
            return
        name, writer = self._writer(folder)
        # Only the schema's columns are taken: the ``_`` bookkeeping ones stay behind.
        writer.write_table(pa.Table.from_pylist(rows, schema=self.schema(folder)))
        self.files[name] += len(rows)
        self.buffers[folder] = []
        if self.rows_per_file and self.files[name] >= self.rows_per_file:
            writer.close()
            del self.writers[folder]

    def _writer(self, folder: str) -> tuple[str, pq.ParquetWriter]:
        if folder not in self.writers:
            index = self.first_part + sum(1 for path in self.files if path.startswith(folder + "/"))
            name = part_name(folder, index)
            path = posixpath.join(self.root, name)
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            self.writers[folder] = (name, pq.ParquetWriter(path, self.schema(folder), filesystem=self.fs,
                                                           compression="zstd"))
            self.files[name] = 0
        return self.writers[folder]

    def close(self) -> dict[str, int]:
        """Flush and close everything; return ``{relative file path: rows}``."""
        for folder in list(self.buffers):
            self._flush(folder)
        for _, writer in self.writers.values():
            writer.close()
        self.writers = {}
        return dict(sorted(self.files.items()))


def remove_stale_parts(root: str, storage: StorageConfig, folders, keep: set[str]) -> list[str]:
    """Delete ``<folder>/part-*.parquet`` files directly inside this job's ``folders`` that the run
    did not write (``keep``: relative paths). Anything else under the root (another job's output
    nested in it, files of other names) is never touched."""
    import pyarrow.fs as pafs

    fs, base = filesystem(root, storage)
    removed = []
    for folder in sorted(folders):
        selector = pafs.FileSelector(posixpath.join(base, folder), recursive=False, allow_not_found=True)
        for info in fs.get_file_info(selector):
            name = posixpath.basename(info.path)
            relative = f"{folder}/{name}"
            if info.type == pafs.FileType.File and PART.match(name) and relative not in keep:
                fs.delete_file(info.path)
                removed.append(relative)
    return removed
