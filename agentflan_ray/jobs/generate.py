"""The `generate` job: source trajectories -> Agent-FLAN sample shards, quarantine and a manifest.

Read top to bottom, the job is::

    preflight              list input files on the driver, cut them into deterministic read tasks;
                           with `rewrite: llm` also check the API key and model with one call
    ray.data.from_items    one row per read task
      .map(run_read_task)  on workers: stream records -> parse -> align -> balance -> Parquet shards
                           (`rewrite: llm`: samples of REWRITE_STREAMS are queued instead, as
                           trajectory rows in rewrite_queue/)
    rewrite_queued         `rewrite: llm` only: read_parquet(queue) -> map_batches(LLMStage, RewriteTask)
                           on an actor pool -> the driver balances and writes them in queue order
    merge tallies          every record read is counted as written, quarantined or held out (the
                           ToolBench trajectories `eval_holdout` keeps for the eval suites), per source
    finish_output          a rerun replaces the files of its own folders (the queue goes), then the
                           manifest, last
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import pyarrow.fs as pafs
import ray

from agentflan_ray.aligning.align import align, held_out_for_eval
from agentflan_ray.aligning.prompts import PROMPT_VERSION
from agentflan_ray.aligning.rewrite import QUEUE, QUEUE_SCHEMA, REWRITE_STREAMS, RewriteTask
from agentflan_ray.aligning.split import held_out
from agentflan_ray.balancing.balance import BalanceConfig, balance_sample, trained_tokens
from agentflan_ray.config import ConfigError, JobConfig
from agentflan_ray.llm.settings import LLMConfig, cost, price_per_1k
from agentflan_ray.negatives.settings import NegativeStream
from agentflan_ray.reading.decode import PREVIEW, RawRecord, iter_raw_records
from agentflan_ray.reading.parquet_files import read_parquet_files
from agentflan_ray.reading.parse import parse_record
from agentflan_ray.reading.plan import FileRange, ReadTask, plan_read_tasks
from agentflan_ray.reading.turns import record_id
from agentflan_ray.records import (
    STREAMS,
    EnvTrajectory,
    Quarantined,
    RecordError,
    Sample,
    ToolTrajectory,
    trajectory_to_row,
)
from agentflan_ray.storage import expand, filesystem, join, s3_endpoint
from agentflan_ray.writing.accounting import Progress, Tally, all_accounted
from agentflan_ray.writing.manifest import build_manifest, finish_output, start_output
from agentflan_ray.writing.shards import QUARANTINE, ShardWriter, sample_schema

if TYPE_CHECKING:  # the LLM client (openai) is imported where it is used: read tasks never need it
    from agentflan_ray.llm.client import LLMClient

AGENTINSTRUCT_STREAMS = ("agent_instruct_react", "agent_instruct_tflan")


@dataclass
class InputSpec:
    format: Literal["toolbench", "agentinstruct", "agentflan", "sharegpt"]
    path: str
    # Name recorded in the `source` column; defaults to the format.
    source: str = ""

    def validate(self, key: str) -> None:
        if not self.path:
            raise ConfigError(f"{key}.path: must not be empty")
        if not self.source:
            self.source = self.format


@dataclass
class ToolBenchSplit:
    """Shares of ToolBench trajectories per stream; a trajectory lands in exactly one."""

    react: float = 0.1
    tflan_cot: float = 0.3
    tflan_decomposed: float = 0.6

    def validate(self, key: str) -> None:
        shares = dataclasses.asdict(self)
        for name, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"{key}.{name}: must be within [0, 1], got {share}")
        if abs(sum(shares.values()) - 1.0) > 1e-6:
            raise ConfigError(f"{key}: shares must add up to 1, got {sum(shares.values()):.4f}")


@dataclass
class GenerateConfig(JobConfig):
    """The `generate` job: source trajectories -> Agent-FLAN sample shards (see the module docstring)."""

    inputs: list[InputSpec] = field(default_factory=list)
    output: str = "./out/run1"
    # template: stock phrasing, no API call; llm: the prose of REWRITE_STREAMS written through `llm`
    rewrite: Literal["template", "llm"] = "template"
    llm: LLMConfig = field(default_factory=LLMConfig)
    # The `negative` stream: validated negatives built from these inputs through `llm` (count 0: none).
    negatives: NegativeStream = field(default_factory=NegativeStream)
    seed: int = 0
    toolbench_split: ToolBenchSplit = field(default_factory=ToolBenchSplit)
    # Fraction of ToolBench trajectories that also yield one `instruct` (format-following) sample.
    instruct_share: float = 0.05
    # Fraction of ToolBench trajectories held out for the `tool_call` / `instruct` eval suites (0: none):
    # no sample, no negative material; `agentflan-ray eval-sets --generate-manifest <output>` builds them.
    eval_holdout: float = 0.0
    agentinstruct_streams: list[str] = field(default_factory=lambda: list(AGENTINSTRUCT_STREAMS))
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    # A single source record larger than this is quarantined as `record_too_large`.
    max_record_bytes: int = 16 * 1024 * 1024
    # Input is cut into read tasks of about this many bytes (JSONL files are split by byte range).
    task_bytes: int = 32 * 1024 * 1024
    # Rows per Parquet row group; bounds writer memory.
    row_group_rows: int = 2000
    # Retries of a read task that failed outside record handling (S3 or disk errors).
    task_retries: int = 3
    # `--estimate` reads about this many records (spread over the input) to project the LLM cost.
    estimate_records: int = 200

    def validate(self, key: str = "") -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input is required")
        if not self.output:
            raise ConfigError("output: must not be empty")
        if not 0.0 <= self.instruct_share <= 1.0:
            raise ConfigError(f"instruct_share: must be within [0, 1], got {self.instruct_share}")
        if not 0.0 <= self.eval_holdout < 1.0:
            raise ConfigError(f"eval_holdout: must be within [0, 1), got {self.eval_holdout}")
        for name in self.agentinstruct_streams:
            if name not in AGENTINSTRUCT_STREAMS:
                raise ConfigError(f"agentinstruct_streams: unknown stream {name!r}; use {list(AGENTINSTRUCT_STREAMS)}")
        if self.max_record_bytes < 1024:
            raise ConfigError(f"max_record_bytes: must be at least 1024, got {self.max_record_bytes}")
        if self.task_bytes < 1024:
            raise ConfigError(f"task_bytes: must be at least 1024, got {self.task_bytes}")
        if self.task_retries < 0:
            raise ConfigError(f"task_retries: must be 0 or more, got {self.task_retries}")
        if self.estimate_records < 1:
            raise ConfigError(f"estimate_records: must be positive, got {self.estimate_records}")
        if self.row_group_rows < 1:
            raise ConfigError(f"row_group_rows: must be positive, got {self.row_group_rows}")


Config = GenerateConfig
NAME = "generate"
FOLDERS = (*STREAMS, QUARANTINE, QUEUE)  # the only folders of its root this job writes or cleans
REWRITE_ROWS_PER_FILE = 100_000


def shard_schema(folder: str):
    return QUEUE_SCHEMA if folder == QUEUE else sample_schema(folder)


def run_read_task(row: dict, config: GenerateConfig) -> dict:
    task = ReadTask.from_row(row)
    tally = Tally()
    writer = ShardWriter(config.output, config.storage, shard_schema, config.row_group_rows, first_part=task.index)
    ratios = config.balance.resolved()
    for piece in task.ranges:
        for raw in iter_raw_records(piece, config):
            tally.read(piece.source)
            outcome = process_raw_record(raw, piece, config, ratios, writer, tally)
            if isinstance(outcome, Quarantined):
                tally.outcome(piece.source, "quarantined", outcome.reason)
                writer.add(QUARANTINE, outcome.to_row())
                continue
            tally.outcome(piece.source, outcome)
            if outcome == "held_out":
                tally.extra["held_out_for_eval"][piece.source] += 1
    tally.files = writer.close()
    return {"index": task.index, "stats": tally.to_json()}


def process_raw_record(raw: RawRecord, piece: FileRange, config, ratios, writer, tally) -> Quarantined | str:
    """Write the samples of one record and return ``"written"``; ``"held_out"`` for a trajectory kept
    for the eval suites (nothing written); the quarantine row instead if it cannot be used."""
    if raw.error:
        return Quarantined(piece.source, raw.where, raw.error, raw.detail, piece.name, raw.preview)
    source_id = record_id(raw.value, raw.where)
    try:
        trajectory = parse_record(piece.format, raw.value, piece.source, source_id, tally.extra["notes"])
        if held_out_for_eval(trajectory, config):
            return "held_out"
        samples = align(trajectory, config)
    except RecordError as exc:
        return Quarantined(piece.source, source_id, exc.reason, exc.detail, piece.name, _preview(raw.value))
    except RecursionError:  # a value nested about as deep as the decoder allows, recursed over again
        detail = "nested too deep to process"
        return Quarantined(piece.source, source_id, "too_deep", detail, piece.name, _preview(raw.value))
    except Exception as exc:  # noqa: BLE001 - one bad record must never stop the job
        detail = f"{type(exc).__name__}: {exc}"
        return Quarantined(piece.source, source_id, "internal_error", detail, piece.name, _preview(raw.value))
    if not samples:
        return Quarantined(piece.source, source_id, "no_samples", "the record produced no sample", piece.name)
    for sample in samples:
        if config.rewrite == "llm" and rewritable(trajectory, sample):  # its prose is written later
            writer.add(QUEUE, {**trajectory_to_row(trajectory), "target": sample.stream})
            tally.extra["rewrite"]["queued"] += 1
            continue
        write_sample(sample, ratios, config.seed, writer, tally)
    return "written"


def rewritable(trajectory, sample: Sample) -> bool:
    """Samples rendered from a parsed trajectory (not the release's already-aligned conversations)."""
    return sample.stream in REWRITE_STREAMS and isinstance(trajectory, ToolTrajectory | EnvTrajectory)


def write_sample(sample: Sample, ratios: dict, seed: int, writer: ShardWriter, tally: Tally) -> None:
    tally.extra["tokens_before"].update(trained_tokens(sample))
    sample = balance_sample(sample, ratios, seed)
    tally.extra["tokens_after"].update(trained_tokens(sample))
    tally.extra["samples"][sample.stream] += 1
    writer.add(sample.stream, sample.to_row())


def _preview(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)[:PREVIEW]
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:PREVIEW]


def preflight(config: GenerateConfig) -> tuple[list[ReadTask], LLMClient | None]:
    """On the driver, before Ray starts: every input matches files, which are cut into read tasks;
    with `rewrite: llm`, one cheap call stops a bad key, an unknown model or an unreachable URL."""
    if not config.storage.endpoint_url:
        # Resolve once on the driver so every worker reaches the same S3 endpoint.
        config.storage.endpoint_url = s3_endpoint(config.storage)
    tasks, unmatched = plan_read_tasks(config)
    if unmatched:
        raise FileNotFoundError("inputs: " + "; ".join(f"{path} matched no file" for path in unmatched))
    missing = [spec for spec in config.negatives.tool_catalogs if not expand(spec, config.storage)]
    if config.negatives.count and missing:
        raise FileNotFoundError("negatives.tool_catalogs: " + "; ".join(f"{p} matched no file" for p in missing))
    probe = None
    if config.rewrite == "llm" or config.negatives.count:
        from agentflan_ray.llm.client import LLMClient

        probe = LLMClient(config.llm)
        asyncio.run(probe.preflight())
    return tasks, probe


def run(config: GenerateConfig, log=print, prepared: tuple[list[ReadTask], LLMClient | None] | None = None) -> dict:
    """Run the job on the connected Ray cluster (``ray.init`` is the caller's) and return the manifest."""
    started = time.monotonic()
    tasks, probe = preflight(config) if prepared is None else prepared
    start_output(config.output, config.storage)
    log(f"[generate] {len(tasks)} read tasks over {sum(len(t.ranges) for t in tasks)} file pieces -> {config.output}")
    tally = Tally()
    if tasks:
        # A read task rewrites the same shard names, so retrying one after an I/O error is safe.
        context = ray.data.DataContext.get_current()
        context.retried_map_errors = True
        context.max_map_retries = config.task_retries
        dataset = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=len(tasks))
        results = dataset.map(run_read_task, fn_kwargs={"config": config}, **config.placement.remote_args())
        progress = Progress(NAME, len(tasks), "read tasks", log, config.progress)
        for row in results.iter_rows():
            tally.merge(row["stats"])
            progress.update(tally)
    rewrite = None
    queue = sorted(path for path in tally.files if path.startswith(QUEUE + "/"))
    for path in queue:  # working files, removed when the job finishes
        del tally.files[path]
    if probe is not None and config.rewrite == "llm":
        rewrite = rewrite_queued(config, queue, probe, len(tasks), tally, log)
    negatives = negative_stream(config, tasks, probe, tally, log) if config.negatives.count else None
    extra = tally.extra
    manifest = build_manifest(
        NAME, config, tally,
        samples={"total": sum(extra["samples"].values()), "per_stream": dict(sorted(extra["samples"].items()))},
        trained_tokens={
            "estimate": "characters / 4 of assistant turns with loss",
            "balance_ratios": config.balance.resolved(),
            "before_balancing": dict(sorted(extra["tokens_before"].items())),
            "after_balancing": dict(sorted(extra["tokens_after"].items())),
        },
        notes=dict(sorted(extra["notes"].items())),
        rewrite=rewrite or {"mode": "template"},
        negatives=negatives,
        eval_holdout=eval_holdout_section(config, tally) if config.eval_holdout else None,
    )
    finish_output(config.output, config.storage, FOLDERS, manifest)
    remove_if_empty(config.output, config.storage, QUEUE)
    counts = manifest["counts"]
    log(
        f"[generate] done in {time.monotonic() - started:.1f}s: read {counts['read']}, written {counts['written']}, "
        f"quarantined {counts['quarantined']}, held out for eval {counts.get('held_out', 0)}; "
        f"samples {manifest['samples']['total']}"
    )
    return manifest


def eval_holdout_section(config: GenerateConfig, tally: Tally) -> dict:
    """The manifest's ``eval_holdout``: what `eval-sets --generate-manifest` needs to build the suites
    from exactly the trajectories this run did not train on."""
    return {
        "seed": config.seed, "share": config.eval_holdout,
        "toolbench_inputs": [spec.path for spec in config.inputs if spec.format == "toolbench"],
        "held_out_for_eval": dict(sorted(tally.extra["held_out_for_eval"].items())),
        "negative_material_left_out": tally.extra["eval_holdout"]["negative_material_left_out"],
    }


def negative_stream(config: GenerateConfig, tasks: list[ReadTask], probe, tally: Tally, log) -> dict:
    """`negatives.count` validated negatives from the job's inputs into the `negative` stream, counted
    as the source `negatives` (dropped ones quarantined with their reason)."""
    from agentflan_ray.jobs.negatives import (
        NegativesConfig,
        merge_cases,
        produce,
        read_catalogs,
        read_material,
        report,
    )

    settings = config.negatives
    negatives = NegativesConfig(
        inputs=config.inputs, tool_catalogs=settings.tool_catalogs, output=config.output, count=settings.count,
        agent_h_count=0, positives=0, scenarios=settings.scenarios, llm_queries=settings.llm_queries,
        dedupe_threshold=settings.dedupe_threshold, seed=config.seed, llm=config.llm, storage=config.storage,
        progress=config.progress, max_record_bytes=config.max_record_bytes, task_bytes=config.task_bytes)
    writer = ShardWriter(config.output, config.storage, sample_schema, config.row_group_rows, first_part=len(tasks))
    ratios = config.balance.resolved()

    def dropped(row: dict) -> None:
        writer.add(QUARANTINE, Quarantined("negatives", row["id"], f"negative_{row['reason'].split(':', 1)[0]}",
                                           row["reason"], "", row["query"][:PREVIEW]).to_row())

    log(f"[generate] building {settings.count:,} negatives")
    material = read_material(negatives, tasks, read_catalogs(negatives))
    tally.extra["eval_holdout"]["negative_material_left_out"] += drop_held_out_material(material, config.seed, config.eval_holdout)
    made = produce(negatives, material, probe, lambda row: write_sample(Sample.from_row(row), ratios, config.seed,
                                                                        writer, tally), dropped, log)
    tally.files.update(writer.close())
    merge_cases(tally, made.answers, "negatives")
    summary = report(made, negatives, probe.model)
    return {"cases": summary["cases"], "llm": summary["llm"]}


def drop_held_out_material(material: dict[str, list[dict]], seed: int, share: float) -> int:
    """Leave out the negative material (query, tool list) of trajectories held out for the eval suites,
    so no training negative is built from them; how many rows went."""
    dropped = 0
    for kind, items in material.items():
        kept = [m for m in items if m["source"] != "toolbench" or not held_out(seed, m["id"], share)]
        dropped += len(items) - len(kept)
        material[kind] = kept
    return dropped


def projected_cost_line(tally: Tally, price: dict, total: int) -> str:
    from agentflan_ray.llm.stage import cost_line

    done = tally.total("read")
    spent = cost(tally.extra["llm"], price)
    return cost_line(tally, price) + (f" · ${spent * total / done:,.2f} projected" if done else "")


def remove_if_empty(root: str, storage, folder: str) -> None:
    """A local working folder left empty (S3 has no folders)."""
    fs, base = filesystem(root, storage)
    path = posixpath.join(base, folder)
    if fs.get_file_info(path).type == pafs.FileType.Directory and \
            not fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        fs.delete_dir(path)


def rewrite_queued(config: GenerateConfig, queue: list[str], probe: LLMClient, first_part: int, tally: Tally,
                   log) -> dict:
    """The queued trajectories through the LLM stage; their samples balanced and written in queue
    order (so a rerun answered from the cache writes the same bytes). The manifest's `rewrite`."""
    from agentflan_ray.llm.budget import create_budget
    from agentflan_ray.llm.client import Secret
    from agentflan_ray.llm.stage import LLMStage, account_rows

    llm, queued = config.llm, tally.extra["rewrite"]["queued"]
    price = price_per_1k(llm.prices, probe.model)
    asked = Tally()  # one "row" per queued trajectory: written, or dead-lettered (then its template)
    status, pieces, samples = Counter(), Counter(), Counter()  # per sample; fallen-back pieces; whole samples
    budget_stats = None
    log(f"[generate] rewriting {queued:,} trajectories with {probe.model} ({llm.actors} actors x "
        f"{llm.concurrency} in flight, rpm {llm.rpm or 'learned/none'})")
    started = time.monotonic()
    if queue:
        budget = create_budget(llm.rpm, llm.tpm, llm.burst_s, llm.learn_limits)
        context = ray.data.DataContext.get_current()
        preserve_order = context.execution_options.preserve_order
        context.execution_options.preserve_order = True  # rows come back in queue order
        try:
            dataset = read_parquet_files([join(config.output, path) for path in queue], config.storage,
                                         llm.batch_size, placement=config.placement)
            results = dataset.map_batches(
                LLMStage,
                fn_constructor_kwargs={"task": RewriteTask(config.seed, probe.model),
                                       "schema": sample_schema(""), "llm": llm, "storage": config.storage,
                                       "cache_uri": join(config.output, "llm_cache"), "budget": budget,
                                       "api_key": Secret(probe.api_key)},
                batch_size=llm.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=llm.actors),
                num_cpus=0.25, scheduling_strategy="SPREAD", **config.placement.remote_args(),
            )
            writer = ShardWriter(config.output, config.storage, sample_schema, config.row_group_rows,
                                 first_part=first_part, rows_per_file=REWRITE_ROWS_PER_FILE)
            ratios = config.balance.resolved()
            progress = Progress(NAME, queued, "trajectories rewritten", log, config.progress,
                                detail=lambda t: projected_cost_line(t, price, queued))
            for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
                done = account_rows(table, asked, "rewrite")
                for row in table.to_pylist():
                    sample = Sample.from_row(row)
                    meta = json.loads(sample.meta)
                    status[meta["status"]] += 1
                    pieces.update(meta["fallbacks"].values())
                    if "fallback" in meta:
                        samples[meta["fallback"].split(":", 1)[0]] += 1
                    write_sample(sample, ratios, config.seed, writer, tally)
                progress.update(asked, done)
            tally.files.update(writer.close())
            budget_stats = ray.get(budget.stats.remote()) if budget is not None else None
        finally:
            context.execution_options.preserve_order = preserve_order
    usage = asked.extra["llm"]
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "mode": "llm", "model": probe.model, "prompt_version": PROMPT_VERSION,
        "trajectories": queued, "asked": asked.total("read"),
        "rewritten": status["rewritten"], "partly_rewritten": status["partial"], "template": status["template"],
        "fell_back": {"pieces_by_reason": dict(sorted(pieces.items())), "samples_by_reason": dict(sorted(samples.items()))},
        "dead_lettered": asked.counts()["per_reason"],
        **{k: usage[k] for k in ("requests", "cached", "reasks", "prompt_tokens", "completion_tokens")},
        "tokens_per_trajectory": round(tokens / max(asked.total("read") - usage["cached"], 1), 1),
        "cost_usd": round(cost(usage, price), 6),
        "seconds": round(time.monotonic() - started, 3),
        "budget": budget_stats,
    }


def estimate(config: GenerateConfig, log=print) -> dict:
    """`--estimate`: projected requests, tokens, cost and time of `rewrite: llm`; calls nothing."""
    from agentflan_ray.jobs.estimate import estimate as project

    if config.rewrite != "llm":
        log("[generate --estimate] rewrite is 'template': no API call would be made (add rewrite=llm)")
    return project(config, log)


def succeeded(manifest: dict) -> bool:
    return all_accounted(manifest["counts"])
