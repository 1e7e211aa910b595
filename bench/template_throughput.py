"""Template-mode throughput and peak memory of the generate job on ToolBench-sized trajectories.

    python bench/template_throughput.py --records 100000
    python bench/template_throughput.py --records 10000
    python bench/template_throughput.py --records 100000 --only-valid

The ten real ToolBench answer trees in tests/fixtures are replicated with new ids into JSONL shards
(one tree per line, ~58 KB each, as in the released data), then the real `generate` job runs over
them on a local Ray with the machine's CPUs. Prints one JSON line: records, seconds,
records_per_s, peak_rss_mb (driver + every Ray process, sampled every 0.2 s), and the counts.

Absolute speeds differ between machines of one kind, so the same run also times a bare pass over
the same files with as many processes as Ray has CPUs, that only reads each line and ``json.loads``
it (the floor of any reader), and reports ``ratio_to_bare`` = generate's records/s over the bare
pass's. The files are read once before either is timed, so both find them in the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "toolbench" / "answer"


def make_input(directory: Path, records: int, per_shard: int, only_valid: bool) -> int:
    trees = [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*/*.json"))]
    if only_valid:
        trees = [t for t in trees if t["answer_generation"].get("finish_type") == "give_answer"
                 and t["answer_generation"].get("valid_data")]
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for shard in range((records + per_shard - 1) // per_shard):
        with open(directory / f"toolbench-{shard:05d}.jsonl", "w") as out:
            for i in range(min(per_shard, records - written)):
                tree = trees[(written + i) % len(trees)]
                out.write(json.dumps({**tree, "id": f"bench-{written + i}"}) + "\n")
        written += min(per_shard, records - written)
    return sum(p.stat().st_size for p in directory.iterdir())


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants (the local Ray cluster)."""

    def __init__(self):
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        me = psutil.Process()
        while not self.stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def load_lines(path: str) -> int:
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                json.loads(line)
                count += 1
    return count


def bare_pass(paths: list[str], processes: int) -> tuple[int, float]:
    """Records and seconds to read and json.loads every line, ``processes`` files at a time."""
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        records = sum(pool.map(load_lines, paths, chunksize=1))
    return records, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=2_000)
    parser.add_argument("--task-bytes", type=int, default=32 << 20)
    parser.add_argument("--only-valid", action="store_true", help="replicate only the 6 trees that are kept")
    parser.add_argument("--workdir", default="", help="keep input and output here (default: a temp dir)")
    args = parser.parse_args()

    import ray

    from agentflan_ray.config import load_config
    from agentflan_ray.jobs import generate as job

    # Also runs against a checkout from before the job-shape change (config in config.py, generate()),
    # to compare the two on one machine: PYTHONPATH=<old checkout> python bench/template_throughput.py
    GenerateConfig = getattr(job, "GenerateConfig", None) or __import__("agentflan_ray.config").config.GenerateConfig
    generate = getattr(job, "run", None) or job.generate

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="afr-bench-"))
    data, out = workdir / "input", workdir / "out"
    if out.exists():
        shutil.rmtree(out)
    input_bytes = make_input(data, args.records, args.per_shard, args.only_valid)
    config = load_config(GenerateConfig, None, [
        f'inputs=[{{format: toolbench, path: "{data}/*.jsonl"}}]', f"output={out}",
        f"task_bytes={args.task_bytes}", "progress=false",
    ])
    paths = sorted(str(p) for p in data.glob("*.jsonl"))
    for path in paths:  # into the page cache before anything is timed
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    cpus = os.cpu_count()
    bare_records, bare_seconds = bare_pass(paths, cpus)
    ray.init(num_cpus=cpus, logging_level="WARNING", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    memory = PeakMemory()
    memory.thread.start()
    started = time.monotonic()
    manifest = generate(config, log=lambda *_: None)
    seconds = time.monotonic() - started
    memory.stop.set()
    memory.thread.join()
    ray.shutdown()
    counts = manifest["counts"]
    print(json.dumps({
        "records": counts["read"], "written": counts["written"], "quarantined": counts["quarantined"],
        "input_mb": round(input_bytes / 2**20), "seconds": round(seconds, 1),
        "records_per_s": round(counts["read"] / seconds), "peak_rss_mb": round(memory.peak / 2**20),
        "bare_records_per_s": round(bare_records / bare_seconds),
        "ratio_to_bare": round(counts["read"] / seconds / (bare_records / bare_seconds), 3),
        "cpus": psutil.cpu_count(), "samples": manifest["samples"]["per_stream"],
    }))
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
