"""Cut the input into read tasks of about ``task_bytes`` each, deterministically.

Files are listed on the driver (names and sizes only), sorted, and packed in order. A JSONL file
larger than a task is split into byte ranges (each range reads the lines that start inside it);
JSON and Parquet files are read whole by one task. Task ``i`` writes ``part-{i:05d}`` files, so the
same input and config always produce the same file names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from agentflan_ray.storage import expand

if TYPE_CHECKING:
    from agentflan_ray.generate import GenerateConfig


@dataclass
class FileRange:
    format: str
    source: str
    path: str  # as the filesystem of `uri` understands it
    uri: str  # the input spec's path, used to pick the filesystem
    name: str  # relative name, the base of record ids
    start: int
    end: int | None  # None: to the end of the file
    kind: str  # json | jsonl | parquet


@dataclass
class ReadTask:
    index: int
    ranges: list[FileRange]

    def to_row(self) -> dict:
        return {"index": self.index, "ranges": [asdict(r) for r in self.ranges]}

    @classmethod
    def from_row(cls, row: dict) -> ReadTask:
        return cls(index=row["index"], ranges=[FileRange(**r) for r in row["ranges"]])


def file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    return "json"


def plan_read_tasks(config: GenerateConfig) -> tuple[list[ReadTask], list[str]]:
    """Return the tasks and the list of inputs that matched no file (reported, not fatal)."""
    pieces: list[tuple[int, FileRange]] = []
    empty = []
    for spec in config.inputs:
        files = expand(spec.path, config.storage)
        if not files:
            empty.append(spec.path)
        for path, size, name in files:
            kind = file_kind(path)
            if kind == "jsonl" and size > config.task_bytes:
                for start in range(0, size, config.task_bytes):
                    end = min(start + config.task_bytes, size)
                    pieces.append((end - start, FileRange(spec.format, spec.source, path, spec.path, name, start, end, kind)))
            else:
                pieces.append((size, FileRange(spec.format, spec.source, path, spec.path, name, 0, None, kind)))
    tasks: list[ReadTask] = []
    current: list[FileRange] = []
    current_bytes = 0
    for size, piece in pieces:
        if current and current_bytes + size > config.task_bytes:
            tasks.append(ReadTask(len(tasks), current))
            current, current_bytes = [], 0
        current.append(piece)
        current_bytes += size
    if current:
        tasks.append(ReadTask(len(tasks), current))
    return tasks, empty
