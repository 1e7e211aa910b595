"""DeepSpeed checkpoints through Ray Train: save with the loop state, resume on any world size.

A checkpoint directory, as Ray Train stores it under ``storage_path/run_name/checkpoint_*``:

    latest                        DeepSpeed's pointer to the tag below
    global_step12/                DeepSpeed ZeRO shards: model states + one optimizer file per rank
    agentflan_state.json          {"step": 12, "world_size": 2}

A ZeRO checkpoint only loads on the world size that wrote it (its optimizer state is partitioned
per rank). When an elastic run restarts on a different number of workers, the checkpoint is first
converted to DeepSpeed's *universal* format (``ds_to_universal``: one fp32 file per parameter and
optimizer moment, independent of the partitioning), once per node under ``scratch_dir`` (default
``$TMPDIR``; it takes about as much disk as the checkpoint), loaded with
``checkpoint.load_universal``, and removed.
Later checkpoints are ordinary ZeRO checkpoints of the new size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray.train

STATE = "agentflan_state.json"
FINAL_METRICS = "final_metrics.json"  # beside the checkpoints: <storage_path>/<run_name>/


def final_metrics_location(storage_path: str, run_name: str, storage) -> tuple:
    """Where rank 0 leaves the last step's metrics. Ray Train's Result only carries the metrics of
    the latest checkpoint, which is not the last step when ``checkpoint_at_end`` is off."""
    from agentflan_ray.storage import filesystem

    fs, root = filesystem(storage_path, storage)
    return fs, f"{root.rstrip('/')}/{run_name}/{FINAL_METRICS}"


def write_final_metrics(fs, path: str, metrics: dict) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(metrics).encode())


def read_final_metrics(fs, path: str) -> dict | None:
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


@dataclass
class Resume:
    directory: str | None = None  # load this with engine.load_checkpoint
    state: dict = field(default_factory=lambda: {"step": 0})
    universal: bool = False  # the directory holds a universal checkpoint (world size changed)


@contextlib.contextmanager
def resume_point(world_size: int, local_rank: int, scratch_dir: str = "") -> Iterator[Resume]:
    """The latest checkpoint of this run as something DeepSpeed can load on ``world_size`` ranks;
    a universal copy, when one is needed, goes under ``scratch_dir`` (empty: the temp directory)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield Resume()
        return
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE)) as f:
            state = json.load(f)
        if state.get("world_size", world_size) == world_size:
            yield Resume(directory, state)
            return
        key = hashlib.sha1(f"{checkpoint.path}:{state['step']}".encode()).hexdigest()[:16]
        universal = os.path.join(scratch_dir or tempfile.gettempdir(), "agentflan-universal", key)
        if local_rank == 0 and not os.path.exists(os.path.join(universal, "latest_universal")):
            to_universal(directory, universal)
        _barrier()  # every node's copy exists before anyone loads it
        yield Resume(universal, state, universal=True)
        _barrier()  # everyone has loaded it: the copy (fp32 weights + optimizer) can go
        if local_rank == 0:
            shutil.rmtree(universal, ignore_errors=True)


def to_universal(directory: str, output_root: str) -> str:
    """Convert the ZeRO checkpoint in ``directory`` to ``output_root/<tag>`` (universal format)."""
    from deepspeed.checkpoint import ds_to_universal

    with open(os.path.join(directory, "latest")) as f:
        tag = f.read().strip()
    os.makedirs(output_root, exist_ok=True)
    args = argparse.Namespace(input_folder=os.path.join(directory, tag), output_folder=os.path.join(output_root, tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(None):  # it prints every parameter name
        ds_to_universal.main(args)
    return os.path.join(output_root, tag)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_and_report(engine, metrics: dict, state: dict) -> None:
    """Every rank writes its ZeRO shard into one directory; rank 0 adds the loop state."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory)
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(directory, STATE), "w") as f:
                json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
