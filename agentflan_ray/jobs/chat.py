"""The `chat` job: a file of chat requests -> answers, on the whole cluster.

    agentflan-ray chat input=requests.jsonl output=./out/chat llm.base_url=http://127.0.0.1:8000/v1 llm.rpm=600

Input rows are JSON objects ``{id, messages, response_format?}`` (JSONL, one per line; or Parquet
with a ``request`` column of that JSON). Output::

    <output>/responses/part-00000.parquet     one row per answered request, in input order
    <output>/dead_letters/part-00000.parquet  requests that failed for good, with the reason
    <output>/quarantine/part-00000.parquet    request lines that are not a usable request
    <output>/llm_cache/                       validated replies by request hash (reused by reruns)
    <output>/manifest.json                    counts, tokens, cost, cache hits, budget; written last

Steps: preflight (inputs listed, key and model checked with one cheap call, before Ray starts) ->
shared budget actor -> read lines (order kept) -> ``map_batches(LLMStage)`` with ``ChatTask`` on an
actor pool -> the driver writes the rows in input order, so a rerun writes byte-identical shards
(answers come from the cache) -> manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from agentflan_ray.config import ConfigError, JobConfig
from agentflan_ray.llm.budget import create_budget
from agentflan_ray.llm.client import LLMClient, Secret
from agentflan_ray.llm.settings import LLMConfig, cost, price_per_1k
from agentflan_ray.llm.stage import BadInput, LLMStage, account_rows, cost_line
from agentflan_ray.reading.parquet_files import read_parquet_files
from agentflan_ray.storage import expand, filesystem, join, s3_endpoint
from agentflan_ray.writing.accounting import Progress, Tally, all_accounted
from agentflan_ray.writing.manifest import build_manifest, finish_output, start_output
from agentflan_ray.writing.shards import QUARANTINE, ShardWriter

NAME = "chat"
SOURCE = "requests"
ROWS_PER_FILE = 100_000
FOLDERS = {"ok": "responses", "dead_letter": "dead_letters", "quarantined": QUARANTINE}
# Everything in a response row is a property of the reply, so a rerun from the cache writes the same
# bytes; how it was obtained this time (cached, attempts) goes to the manifest's counts.
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("status", pa.string()),  # ok | dead_letter | quarantined
    ("content", pa.string()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),  # "<reason>: <detail>" when not ok
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
])


@dataclass
class ChatConfig(JobConfig):
    """The `chat` job: answer a file of chat requests through the rate-limited, cached client."""

    input: str = ""  # JSONL or Parquet rows {id, messages, response_format?}; local path, glob or s3://
    output: str = "./out/chat"
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self, key: str = "") -> None:
        if not self.input:
            raise ConfigError("input: required (a JSONL or Parquet file of chat requests)")
        if not self.output:
            raise ConfigError("output: must not be empty")


Config = ChatConfig


class ChatTask:
    """The chat job's logic for the LLM stage: one request line -> one response row."""

    async def rows(self, row: dict, complete) -> list[dict]:
        request_id, messages, response_format = parse_request(request_text(row))
        completion = await complete(messages, response_format)
        return [{"id": request_id, "status": "ok", "content": completion.content,
                 "finish_reason": completion.finish_reason, "error": "", "prompt_tokens": completion.prompt_tokens,
                 "completion_tokens": completion.completion_tokens}]

    def failed(self, row: dict, outcome: str, reason: str, detail: str) -> dict:
        status = "quarantined" if outcome == "quarantined" else "dead_letter"
        return {"id": request_id(request_text(row)), "status": status, "content": "", "finish_reason": "",
                "error": f"{reason}: {detail}" if detail else reason, "prompt_tokens": 0, "completion_tokens": 0}


def request_text(row: dict) -> str:
    return row["request"] if "request" in row else row["text"]  # Parquet or JSONL lines


def request_id(text) -> str:
    """The request's own id, or a stable one made from the line when it has none."""
    try:
        value = json.loads(text)
        if isinstance(value, dict) and isinstance(value.get("id"), str | int) and not isinstance(value["id"], bool) \
                and str(value["id"]):
            return str(value["id"])
    except (json.JSONDecodeError, TypeError, RecursionError):
        pass
    return f"line-{hashlib.sha1(str(text).encode()).hexdigest()[:12]}"


def parse_request(text: str) -> tuple[str, list[dict], dict | None]:
    """``(id, messages, response_format)`` of one JSON request line; ``BadInput`` when unusable."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise BadInput("bad_request", "not valid JSON") from None
    if not isinstance(value, dict):
        raise BadInput("bad_request", "not a JSON object")
    row_id = value.get("id")
    if not isinstance(row_id, str | int) or isinstance(row_id, bool) or str(row_id) == "":
        raise BadInput("bad_request", "missing id")
    return str(row_id), _messages(value.get("messages")), _format(value.get("response_format"))


def _messages(value) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadInput("bad_request", "messages: not valid JSON") from None
    if not isinstance(value, list) or not value:
        raise BadInput("bad_request", "messages: expected a non-empty list")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise BadInput("bad_request", "messages: each message needs a role and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _format(value):
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) and value else None


def preflight(config: ChatConfig) -> tuple[list[str], LLMClient]:
    """On the driver, before Ray starts: the input files, and one cheap call that stops a bad key,
    an unknown model or an unreachable URL in a second."""
    if not config.storage.endpoint_url:
        config.storage.endpoint_url = s3_endpoint(config.storage)
    paths = [path for path, _, _ in expand(config.input, config.storage)]
    if not paths:
        raise FileNotFoundError(f"input: {config.input} matched no file")
    probe = LLMClient(config.llm)
    asyncio.run(probe.preflight())
    return paths, probe


def read_requests(config: ChatConfig, paths: list[str]) -> ray.data.Dataset:
    fs, _ = filesystem(config.input, config.storage)
    # Reading request lines is light; a fraction of a CPU leaves room beside the stage's actors.
    if all(p.endswith(".parquet") for p in paths):
        scheme = "s3://" if config.input.startswith("s3://") else ""
        return read_parquet_files([scheme + p for p in paths], config.storage, config.llm.batch_size, ["request"],
                                  placement=config.placement)
    return ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True, num_cpus=0.25,
                              **config.placement.remote_args())


def run(config: ChatConfig, log=print, prepared: tuple[list[str], LLMClient] | None = None) -> dict:
    """Answer every request on the connected Ray cluster; the manifest."""
    started = time.monotonic()
    paths, probe = prepared or preflight(config)
    llm = config.llm
    budget = create_budget(llm.rpm, llm.tpm, llm.burst_s, llm.learn_limits)
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows come back in input order
    try:
        dataset = read_requests(config, paths)
        total = dataset.count()
        start_output(config.output, config.storage)
        log(f"[chat] {total:,} requests -> {config.output} (model {probe.model}, {llm.actors} actors x "
            f"{llm.concurrency} in flight, rpm {llm.rpm or 'learned/none'})")
        results = dataset.map_batches(
            LLMStage,
            fn_constructor_kwargs={"task": ChatTask(), "schema": RESULT_SCHEMA, "llm": llm, "storage": config.storage,
                                   "cache_uri": join(config.output, "llm_cache"), "budget": budget,
                                   "api_key": Secret(probe.api_key)},
            batch_size=llm.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=llm.actors),
            num_cpus=0.25, scheduling_strategy="SPREAD",  # actors on every node, so every node's network is used
            **config.placement.remote_args(),
        )
        tally = Tally()
        price = price_per_1k(llm.prices, probe.model)
        writer = ShardWriter(config.output, config.storage, lambda _: RESULT_SCHEMA, rows_per_file=ROWS_PER_FILE)
        progress = Progress(NAME, total, "requests", log, config.progress, detail=lambda t: cost_line(t, price))
        for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
            inputs = account_rows(table, tally, SOURCE)
            for row in table.to_pylist():
                writer.add(FOLDERS[row["status"]], row)
            progress.update(tally, inputs)
        tally.files = writer.close()
    finally:
        context.execution_options.preserve_order = preserve_order
    usage = tally.extra["llm"]
    manifest = build_manifest(
        NAME, config, tally,
        llm={"model": probe.model, **{k: usage[k] for k in ("requests", "cached", "reasks", "prompt_tokens",
                                                              "completion_tokens")},
             "cost_usd": round(cost(usage, price), 6), "prompt_version": llm.prompt_version},
        budget=ray.get(budget.stats.remote()) if budget is not None else None,
        seconds=round(time.monotonic() - started, 3),
    )
    finish_output(config.output, config.storage, FOLDERS.values(), manifest)
    counts = manifest["counts"]
    log(f"[chat] done in {manifest['seconds']:.1f}s: {counts['written']:,} answered ({usage['cached']:,} from cache), "
        f"{counts['dead_lettered']:,} dead letters, {counts['quarantined']:,} quarantined, "
        f"{usage['prompt_tokens'] + usage['completion_tokens']:,} tokens, ${cost(usage, price):.4f}")
    return manifest


def succeeded(manifest: dict) -> bool:
    return all_accounted(manifest["counts"])
