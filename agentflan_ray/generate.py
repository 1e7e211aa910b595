"""The `generate` job: source trajectories -> Agent-FLAN sample shards, quarantine and a manifest.

Read top to bottom, the job is::

    plan_read_tasks        list input files on the driver, cut them into deterministic read tasks
    ray.data.from_items    one row per read task
      .map(run_read_task)  on workers: stream records -> parse -> align -> balance -> Parquet shards
    merge stats            every record read is counted as written or quarantined, per source
    remove_stale_shards    a rerun replaces earlier files, never adds to them
    write_manifest         last, so a manifest means a complete output
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict

import ray

from agentflan_ray.aligning.align import align
from agentflan_ray.balancing.balance import balance_sample, trained_tokens
from agentflan_ray.config import GenerateConfig
from agentflan_ray.reading.decode import PREVIEW, RawRecord, iter_raw_records
from agentflan_ray.reading.parse import parse_record
from agentflan_ray.reading.plan import FileRange, ReadTask, plan_read_tasks
from agentflan_ray.reading.turns import record_id
from agentflan_ray.records import Quarantined, RecordError
from agentflan_ray.storage import s3_endpoint
from agentflan_ray.writing.manifest import (
    build_manifest,
    remove_manifest,
    remove_stale_shards,
    write_manifest,
)
from agentflan_ray.writing.shards import QUARANTINE, ShardWriter


class Tally:
    """Counts of one read task; merged on the driver into the manifest's counts."""

    def __init__(self):
        self.records: dict[str, Counter] = defaultdict(Counter)  # source -> read/written/quarantined
        self.reasons: dict[str, Counter] = defaultdict(Counter)  # source -> reason -> n
        self.samples: Counter = Counter()
        self.tokens_before: Counter = Counter()
        self.tokens_after: Counter = Counter()
        self.notes: Counter = Counter()
        self.files: dict[str, int] = {}

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in vars(self).items()})

    def merge(self, text: str) -> None:
        data = json.loads(text)
        for source, counts in data["records"].items():
            self.records[source].update(counts)
        for source, counts in data["reasons"].items():
            self.reasons[source].update(counts)
        self.samples.update(data["samples"])
        self.tokens_before.update(data["tokens_before"])
        self.tokens_after.update(data["tokens_after"])
        self.notes.update(data["notes"])
        self.files.update(data["files"])


def run_read_task(row: dict, config: GenerateConfig) -> dict:
    task = ReadTask.from_row(row)
    tally = Tally()
    writer = ShardWriter(config.output, f"part-{task.index:05d}", config.storage, config.row_group_rows)
    ratios = config.balance.resolved()
    for piece in task.ranges:
        for raw in iter_raw_records(piece, config):
            tally.records[piece.source]["read"] += 1
            problem = process_raw_record(raw, piece, config, ratios, writer, tally)
            if problem is None:
                tally.records[piece.source]["written"] += 1
                continue
            tally.records[piece.source]["quarantined"] += 1
            tally.reasons[piece.source][problem.reason] += 1
            writer.add(QUARANTINE, problem.to_row())
    tally.files = writer.close()
    return {"index": task.index, "stats": tally.to_json()}


def process_raw_record(raw: RawRecord, piece: FileRange, config, ratios, writer, tally) -> Quarantined | None:
    """Write the samples of one record; return the quarantine row instead if it cannot be used."""
    if raw.error:
        return Quarantined(piece.source, raw.where, raw.error, raw.detail, piece.name, raw.preview)
    source_id = record_id(raw.value, raw.where)
    try:
        trajectory = parse_record(piece.format, raw.value, piece.source, source_id, tally.notes)
        samples = align(trajectory, config)
    except RecordError as exc:
        return Quarantined(piece.source, source_id, exc.reason, exc.detail, piece.name, _preview(raw.value))
    except Exception as exc:  # noqa: BLE001 - one bad record must never stop the job
        detail = f"{type(exc).__name__}: {exc}"
        return Quarantined(piece.source, source_id, "internal_error", detail, piece.name, _preview(raw.value))
    if not samples:
        return Quarantined(piece.source, source_id, "no_samples", "the record produced no sample", piece.name)
    for sample in samples:
        tally.tokens_before.update(trained_tokens(sample))
        balance_sample(sample, ratios, config.seed)
        tally.tokens_after.update(trained_tokens(sample))
        tally.samples[sample.stream] += 1
        writer.add(sample.stream, sample.to_row())
    return None


def _preview(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)[:PREVIEW]
    except (TypeError, ValueError):
        return repr(value)[:PREVIEW]


def generate(config: GenerateConfig, log=print) -> dict:
    """Run the job on the connected Ray cluster (``ray.init`` is the caller's) and return the manifest."""
    started = time.monotonic()
    if not config.storage.endpoint_url:
        # Resolve once on the driver so every worker reaches the same S3 endpoint.
        config.storage.endpoint_url = s3_endpoint(config.storage)
    tasks, unmatched = plan_read_tasks(config)
    remove_manifest(config)
    for path in unmatched:
        log(f"[generate] warning: input {path} matched no file")
    log(f"[generate] {len(tasks)} read tasks over {sum(len(t.ranges) for t in tasks)} file pieces -> {config.output}")
    tally = Tally()
    if tasks:
        # A read task rewrites the same shard names, so retrying one after an I/O error is safe.
        context = ray.data.DataContext.get_current()
        context.retried_map_errors = True
        context.max_map_retries = config.task_retries
        dataset = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=len(tasks))
        results = dataset.map(run_read_task, fn_kwargs={"config": config})
        progress = Progress(len(tasks), log, enabled=config.progress)
        for row in results.iter_rows():
            tally.merge(row["stats"])
            progress.update(tally)
    remove_stale_shards(config, set(tally.files))
    manifest = build_manifest(config, tally)
    write_manifest(config, manifest)
    counts = manifest["counts"]
    log(
        f"[generate] done in {time.monotonic() - started:.1f}s: read {counts['read']}, written {counts['written']}, "
        f"quarantined {counts['quarantined']}; samples {manifest['samples']['total']}"
    )
    return manifest


class Progress:
    """One line at most every two seconds: tasks done, records, rate, quarantined so far."""

    def __init__(self, total: int, log, enabled: bool):
        self.total, self.log, self.enabled = total, log, enabled
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, tally: Tally) -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self.last >= 2.0 or self.done == self.total):
            self.last = now
            self._print(tally, now)

    def _print(self, tally: Tally, now: float) -> None:
        read = sum(c["read"] for c in tally.records.values())
        quarantined = sum(c["quarantined"] for c in tally.records.values())
        rate = read / max(now - self.started, 1e-9)
        self.log(
            f"[generate] {self.done}/{self.total} tasks · {read:,} records · {rate:,.0f} records/s · "
            f"{quarantined:,} quarantined"
        )
        sys.stdout.flush()
