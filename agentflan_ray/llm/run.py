"""The `chat` job: a file of chat requests -> answers and dead letters, on the whole cluster.

    agentflan-ray chat input=requests.jsonl output=./out/chat llm.base_url=http://127.0.0.1:8000/v1 llm.rpm=600

Input rows are JSON objects ``{id, messages, response_format?}`` (JSONL, one per line; or Parquet
with a ``request`` column of that JSON). Output::

    <output>/responses/part-00000.parquet     status ok
    <output>/dead_letters/part-00000.parquet  every request that failed for good, with its error
    <output>/llm_cache/                       validated replies by request hash (reused by reruns)
    <output>/manifest.json                    counts, tokens, cost, cache hits, budget, written last

Steps: preflight (key and model, one cheap call) -> shared budget actor -> read lines ->
``map_batches(ChatStage)`` on an actor pool -> the driver streams results into Parquet and prints
progress -> manifest.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from agentflan_ray.config import ChatRunConfig
from agentflan_ray.llm.budget import create_budget
from agentflan_ray.llm.client import LLMClient, Secret
from agentflan_ray.llm.stage import RESULT_SCHEMA, ChatStage
from agentflan_ray.storage import expand, filesystem, join, s3_endpoint
from agentflan_ray.writing.manifest import package_versions, redacted_config

ROWS_PER_FILE = 100_000


def price_per_1k(prices: dict, model: str) -> dict:
    match = max((name for name in prices if model.startswith(name)), key=len, default=None)
    return prices[match] if match else {"input": 0.0, "output": 0.0}


class ResultWriter:
    """Streams result batches into ``responses/`` and ``dead_letters/``, a new part every N rows."""

    def __init__(self, output: str, storage):
        self.fs, self.root = filesystem(output, storage)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, int] = {}
        self.files: dict[str, int] = {}

    def write(self, table: pa.Table) -> None:
        for status, folder in (("ok", "responses"), ("dead_letter", "dead_letters")):
            part = table.filter(pc.equal(table["status"], status))
            if part.num_rows:
                name = self._name(folder)  # the part this batch goes to, before counting it
                self._writer(folder, name).write_table(part)
                self.rows[folder] = self.rows.get(folder, 0) + part.num_rows
                self.files[name] = self.files.get(name, 0) + part.num_rows

    def _name(self, folder: str) -> str:
        return f"{folder}/part-{self.rows.get(folder, 0) // ROWS_PER_FILE:05d}.parquet"

    def _writer(self, folder: str, name: str) -> pq.ParquetWriter:
        current = self.writers.get(folder)
        if current is not None and current.where != posixpath.join(self.root, name):
            current.close()
            current = None
        if current is None:
            self.fs.create_dir(posixpath.join(self.root, folder), recursive=True)
            current = pq.ParquetWriter(posixpath.join(self.root, name), RESULT_SCHEMA, filesystem=self.fs,
                                       compression="zstd")
            self.writers[folder] = current
        return current

    def close(self) -> dict[str, int]:
        for writer in self.writers.values():
            writer.close()
        return dict(sorted(self.files.items()))


def read_requests(config: ChatRunConfig) -> tuple[ray.data.Dataset, int]:
    files = expand(config.input, config.storage)
    if not files:
        raise FileNotFoundError(f"input matched no file: {config.input}")
    fs, _ = filesystem(config.input, config.storage)
    paths = [path for path, _, _ in files]
    # Reading request lines is light; a fraction of a CPU leaves room beside the stage's actors.
    if all(p.endswith(".parquet") for p in paths):
        dataset = ray.data.read_parquet(paths, filesystem=fs, columns=["request"], num_cpus=0.25)
    else:
        dataset = ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True, num_cpus=0.25)
    return dataset, dataset.count()


def check_endpoint(config: ChatRunConfig) -> LLMClient:
    """One cheap call: a bad key, an unknown model or an unreachable URL stops the job here."""
    probe = LLMClient(config.llm)
    asyncio.run(probe.preflight())
    return probe


def run_chat(config: ChatRunConfig, log=print, probe: LLMClient | None = None) -> dict:
    """``probe``: the client of an earlier ``check_endpoint`` (the CLI checks before starting Ray)."""
    if not config.storage.endpoint_url:
        config.storage.endpoint_url = s3_endpoint(config.storage)
    started = time.monotonic()
    probe = probe or check_endpoint(config)
    llm = config.llm
    budget = create_budget(llm.rpm, llm.tpm, llm.burst_s, llm.learn_limits)
    dataset, total = read_requests(config)
    log(f"[chat] {total:,} requests -> {config.output} (model {probe.model}, {llm.actors} actors x "
        f"{llm.concurrency} in flight, rpm {llm.rpm or 'learned/none'})")
    results = dataset.map_batches(
        ChatStage,
        fn_constructor_kwargs={"llm": llm, "cache_uri": join(config.output, "llm_cache"),
                               "storage": config.storage, "budget": budget, "api_key": Secret(probe.api_key)},
        batch_size=llm.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=llm.actors),
        num_cpus=0.25,
        scheduling_strategy="SPREAD",  # actors on every node, so every node's network is used
    )
    writer = ResultWriter(config.output, config.storage)
    tally = Tally(total, price_per_1k(llm.prices, probe.model), log, config.progress)
    for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
        table = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
        writer.write(table)
        tally.add(table)
    files = writer.close()
    manifest = {
        "format_version": 1,
        "counts": {"read": total, "ok": tally.ok, "dead_letter": tally.dead, "cached": tally.cached},
        "dead_letter_reasons": dict(sorted(tally.reasons.items())),
        "tokens": {"prompt": tally.prompt_tokens, "completion": tally.completion_tokens},
        "cost_usd": round(tally.cost(), 6),
        "budget": ray.get(budget.stats.remote()) if budget is not None else None,
        "seconds": round(time.monotonic() - started, 3),
        "files": [{"path": p, "rows": n} for p, n in files.items()],
        "config": redacted_config(config),
        "versions": package_versions(),
    }
    fs, root = filesystem(config.output, config.storage)
    with fs.open_output_stream(posixpath.join(root, "manifest.json")) as out:
        out.write(json.dumps(manifest, indent=2).encode() + b"\n")
    log(f"[chat] done in {manifest['seconds']:.1f}s: {tally.ok:,} ok ({tally.cached:,} from cache), "
        f"{tally.dead:,} dead letters, {tally.prompt_tokens + tally.completion_tokens:,} tokens, ${tally.cost():.4f}")
    return manifest


class Tally:
    def __init__(self, total: int, price: dict, log, enabled: bool):
        self.total, self.price, self.log, self.enabled = total, price, log, enabled
        self.ok = self.dead = self.cached = self.prompt_tokens = self.completion_tokens = 0
        self.reasons: dict[str, int] = {}
        self.started = self.last = time.monotonic()

    def cost(self) -> float:
        return (self.prompt_tokens * self.price["input"] + self.completion_tokens * self.price["output"]) / 1000

    def add(self, table: pa.Table) -> None:
        rows = table.to_pydict()
        for status, cached, error, p, c in zip(rows["status"], rows["cached"], rows["error"], rows["prompt_tokens"],
                                               rows["completion_tokens"], strict=True):
            if status == "ok":
                self.ok += 1
                self.cached += bool(cached)
                if not cached:
                    self.prompt_tokens += p
                    self.completion_tokens += c
            else:
                self.dead += 1
                reason = error.split(":", 1)[0]
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        now = time.monotonic()
        done = self.ok + self.dead
        if self.enabled and (now - self.last >= 2.0 or done == self.total):
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            projected = self.cost() / max(done - self.cached, 1) * max(self.total - self.cached, 0)
            self.log(f"[chat] {done:,}/{self.total:,} done · {self.total - done:,} pending · {self.dead:,} failed · "
                     f"{rate:,.1f}/s · {self.prompt_tokens + self.completion_tokens:,} tokens · "
                     f"${self.cost():.4f} so far, ~${projected:.4f} projected")
