"""Parquet files into a Ray dataset by light tasks (a quarter CPU each), in file order.

``ray.data.read_parquet`` lists its files in a task that needs a whole CPU. Beside an LLM stage whose
actors already hold part of a 1-CPU node that task never starts, and the job hangs; here one light
task per file reads it in blocks of ``rows`` (so an actor pool shares the rows out).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from agentflan_ray.config import Placement
from agentflan_ray.storage import StorageConfig, filesystem


def read_parquet_files(uris: list[str], storage: StorageConfig, rows: int, columns: list[str] | None = None,
                       placement: Placement | None = None):
    files = ray.data.from_items([{"uri": uri} for uri in uris], override_num_blocks=max(len(uris), 1))
    return files.map_batches(_read, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                             fn_kwargs={"storage": storage, "rows": rows, "columns": columns},
                             **(placement.remote_args() if placement else {}))


def _read(batch: pa.Table, storage: StorageConfig, rows: int, columns: list[str] | None):
    fs, path = filesystem(batch.column("uri")[0].as_py(), storage)
    with fs.open_input_file(path) as f:
        for piece in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns):
            yield pa.Table.from_batches([piece])
