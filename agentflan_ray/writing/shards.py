"""Parquet shards with deterministic names: ``<output>/<stream>/part-<task>.parquet`` and
``<output>/quarantine/part-<task>.parquet``. Rows are buffered per stream and flushed as row groups,
so a writer holds at most ``row_group_rows`` rows per stream in memory."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from agentflan_ray.config import StorageConfig
from agentflan_ray.records import QUARANTINE_SCHEMA, SAMPLE_SCHEMA
from agentflan_ray.storage import expand, filesystem

QUARANTINE = "quarantine"


def sample_shards(output: str, storage: StorageConfig) -> list[str]:
    """Filesystem paths of the sample shards of a generate output (quarantine excluded), sorted."""
    files = expand(output.rstrip("/") + "/*/part-*.parquet", storage)
    paths = [path for path, _, name in files if not name.startswith(QUARANTINE + "/")]
    if not paths:
        raise FileNotFoundError(f"no sample shards under {output} (expected <stream>/part-*.parquet)")
    return paths


class ShardWriter:
    def __init__(self, output: str, part: str, storage: StorageConfig, row_group_rows: int):
        self.fs, self.root = filesystem(output, storage)
        self.part = part
        self.row_group_rows = row_group_rows
        self.buffers: dict[str, list[dict]] = {}
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, int] = {}

    def add(self, stream: str, row: dict) -> None:
        buffer = self.buffers.setdefault(stream, [])
        buffer.append(row)
        if len(buffer) >= self.row_group_rows:
            self._flush(stream)

    def path_of(self, stream: str) -> str:
        return posixpath.join(self.root, stream, f"{self.part}.parquet")

    def _flush(self, stream: str) -> None:
        rows = self.buffers.get(stream)
        if not rows:
            return
        schema = QUARANTINE_SCHEMA if stream == QUARANTINE else SAMPLE_SCHEMA
        if stream not in self.writers:
            path = self.path_of(stream)
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            self.writers[stream] = pq.ParquetWriter(path, schema, filesystem=self.fs, compression="zstd")
        self.writers[stream].write_table(pa.Table.from_pylist(rows, schema=schema))
        self.rows[stream] = self.rows.get(stream, 0) + len(rows)
        self.buffers[stream] = []

    def close(self) -> dict[str, int]:
        """Flush and close everything; return ``{relative file path: rows}``."""
        for stream in list(self.buffers):
            self._flush(stream)
        for writer in self.writers.values():
            writer.close()
        return {f"{stream}/{self.part}.parquet": rows for stream, rows in sorted(self.rows.items())}
