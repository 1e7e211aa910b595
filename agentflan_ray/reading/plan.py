"""Cut the input into read tasks of about ``task_bytes`` each, deterministically.

Files are listed on the driver (names and sizes only), sorted, and packed in order. A JSONL file
larger than a task is split into byte ranges (each range reads the lines that start inside it);
JSON and Parquet files are read whole by one task. Task ``i`` writes ``part-{i:05d}`` files, so the
same input and config always produce the same file names.

An entry that cannot be read (a named pipe, a link loop, an empty file: see ``listing``) is still a
piece, with its quarantine reason in ``problem``: the task reports it as one quarantine row and never
opens it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from agentflan_ray.reading.listing import list_input

if TYPE_CHECKING:
    from agentflan_ray.jobs.generate import GenerateConfig


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
    problem: str = ""  # a quarantine reason for the whole file, which is then never opened
    detail: str = ""
    size: int = 0  # bytes of the file this piece covers (an estimate projects from it)


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
        entries = list_input(spec.path, config.storage)
        if not entries:
            empty.append(spec.path)
        for entry in entries:
            path, size, name, kind = entry.path, entry.size, entry.name, file_kind(entry.path)
            if entry.problem or size == 0:
                problem, detail = (entry.problem, entry.detail) if entry.problem else ("empty_file", "0 bytes")
                pieces.append((0, FileRange(spec.format, spec.source, path, spec.path, name, 0, None, kind,
                                            problem, detail)))
            elif kind == "jsonl" and size > config.task_bytes:
                for start in range(0, size, config.task_bytes):
                    end = min(start + config.task_bytes, size)
                    pieces.append((end - start, FileRange(spec.format, spec.source, path, spec.path, name, start, end,
                                                          kind, size=end - start)))
            else:
                pieces.append((size, FileRange(spec.format, spec.source, path, spec.path, name, 0, None, kind,
                                               size=size)))
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
