"""The `negatives` job: Agent-H-style negative samples at scale, and the held-out Agent-H set.

    agentflan-ray negatives --config jobs/configs/negatives_demo.yaml [count=200000 output=s3://...]

Read top to bottom::

    preflight            list the inputs (read tasks), read the tool catalogs, check the API key
    material             read tasks on Ray: records -> tool-seeking queries, tool lists, general
                         queries, positive controls (``negatives.cases.material_of``); bad records
                         quarantined and counted
    plan                 on the driver, seeded: positives, then cases per (side, scenario), real
                         queries first (``plan_cases``)
    write queries        LLM stage (QueryTask): the cases without a real query get LLM-written ones
    deduplicate          exact and near-duplicate queries removed across both sides (MinHash LSH)
    trim                 each (side, scenario) cut to its target; the rest counted as surplus
    Agent-H set          agent_h/part-00000.jsonl: every held-out case under both protocols
    answer               LLM stage (AnswerTask): training cases -> negative/ samples or dropped/
    manifest             written last: records, cases by scenario and source, duplicates, drops by
                         reason, tokens, cost
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from agentflan_ray.config import ConfigError, JobConfig
from agentflan_ray.jobs.generate import InputSpec
from agentflan_ray.llm.settings import LLMConfig, cost, price_per_1k
from agentflan_ray.negatives import agent_h
from agentflan_ray.negatives.cases import (
    SIDES,
    Case,
    catalog_tool_lists,
    list_id,
    material_of,
    plan_cases,
)
from agentflan_ray.negatives.prompts import PROMPT_VERSION
from agentflan_ray.negatives.tasks import CASE_SCHEMA, QUERY_RESULT_SCHEMA, RESULT_SCHEMA, WRITER_SCHEMA
from agentflan_ray.reading.decode import iter_raw_records
from agentflan_ray.reading.parse import parse_record
from agentflan_ray.reading.plan import ReadTask, plan_read_tasks
from agentflan_ray.reading.turns import record_id
from agentflan_ray.records import Quarantined, RecordError
from agentflan_ray.storage import expand, filesystem, join, s3_endpoint
from agentflan_ray.writing.accounting import Progress, Tally, all_accounted
from agentflan_ray.writing.manifest import build_manifest, finish_output, start_output
from agentflan_ray.writing.shards import QUARANTINE, ShardWriter, sample_schema

NAME = "negatives"
STREAM = "negative"
DROPPED = "dropped"
AGENT_H = "agent_h"
FOLDERS = (STREAM, DROPPED, QUARANTINE)
DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("scenario", pa.string()), ("query", pa.string()),
                            ("reason", pa.string())])


@dataclass
class ScenarioShares:
    no_tools: float = 0.5
    irrelevant_tools: float = 0.5

    def validate(self, key: str) -> None:
        shares = [self.no_tools, self.irrelevant_tools]
        if any(not 0 <= s <= 1 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ConfigError(f"{key}: shares must be within [0, 1] and add up to 1, got {shares}")


@dataclass
class NegativesConfig(JobConfig):
    """The `negatives` job (see the module docstring)."""

    inputs: list[InputSpec] = field(default_factory=list)  # toolbench, agentinstruct, sharegpt records
    tool_catalogs: list[str] = field(default_factory=list)  # T-Eval-style api_descrip.json files
    output: str = "./out/negatives"
    count: int = 1000  # training negatives asked for
    agent_h_count: int = 1845  # held-out negative cases (each rendered under both protocols)
    positives: int = 200  # held-out positive controls (tools offered and needed)
    scenarios: ScenarioShares = field(default_factory=ScenarioShares)
    llm_queries: float = 0.25  # share of queries written by the LLM (more when real ones run out)
    queries_per_request: int = 10
    dedupe_threshold: float = 0.8  # Jaccard of word 3-grams above which two queries are near-duplicates
    agent_h_tool_share: float = 0.3  # share of tool lists held out for the Agent-H side
    seed: int = 0
    llm: LLMConfig = field(default_factory=LLMConfig)
    max_record_bytes: int = 16 * 1024 * 1024
    task_bytes: int = 32 * 1024 * 1024

    def validate(self, key: str = "") -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input is required")
        for name in ("count", "agent_h_count", "positives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 or more")
        for name in ("llm_queries", "dedupe_threshold", "agent_h_tool_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be within [0, 1], got {getattr(self, name)}")
        if self.queries_per_request < 1:
            raise ConfigError("queries_per_request: must be positive")


Config = NegativesConfig


def material_task(row: dict, config: NegativesConfig) -> dict:
    """One read task: its records' material, and every record counted (used or quarantined)."""
    task, tally, material = ReadTask.from_row(row), Tally(), []
    quarantined = []
    for piece in task.ranges:
        for raw in iter_raw_records(piece, config):
            tally.read(piece.source)
            if raw.error:
                problem = Quarantined(piece.source, raw.where, raw.error, raw.detail, piece.name, raw.preview)
            else:
                try:
                    trajectory = parse_record(piece.format, raw.value, piece.source,
                                              record_id(raw.value, raw.where), tally.extra["notes"])
                    found = material_of(trajectory)
                    material += found
                    tally.extra["material"].update(m["kind"] for m in found)
                    tally.outcome(piece.source, "written")
                    continue
                except RecordError as exc:
                    problem = Quarantined(piece.source, raw.where, exc.reason, exc.detail, piece.name)
                except Exception as exc:  # noqa: BLE001 - one bad record never stops the job
                    problem = Quarantined(piece.source, raw.where, "internal_error", f"{type(exc).__name__}: {exc}",
                                          piece.name)
            tally.outcome(piece.source, "quarantined", problem.reason)
            quarantined.append(problem.to_row())
    return {"material": json.dumps(material, ensure_ascii=False), "quarantined": json.dumps(quarantined),
            "stats": tally.to_json()}


def read_catalogs(config: NegativesConfig) -> list[dict]:
    lists = []
    for spec in config.tool_catalogs:
        for path, _, _ in expand(spec, config.storage):
            fs, _ = filesystem(spec, config.storage)
            with fs.open_input_stream(path) as f:
                try:
                    lists += catalog_tool_lists(json.loads(f.read()))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"tool_catalogs: {path} is not JSON: {exc}") from None
    return lists


def preflight(config: NegativesConfig):
    if not config.storage.endpoint_url:
        config.storage.endpoint_url = s3_endpoint(config.storage)
    tasks, unmatched = plan_read_tasks(config)
    if unmatched:
        raise FileNotFoundError("inputs: " + "; ".join(f"{path} matched no file" for path in unmatched))
    missing = [spec for spec in config.tool_catalogs if not expand(spec, config.storage)]
    if missing:
        raise FileNotFoundError("tool_catalogs: " + "; ".join(f"{p} matched no file" for p in missing))
    from agentflan_ray.llm.client import LLMClient

    probe = LLMClient(config.llm)
    asyncio.run(probe.preflight())
    return tasks, read_catalogs(config), probe


def targets_of(config: NegativesConfig) -> dict[tuple[str, str], int]:
    targets = {}
    for side, total in (("agent_h", config.agent_h_count), ("train", config.count)):
        no_tools = round(total * config.scenarios.no_tools)
        targets[(side, "no_tools")], targets[(side, "irrelevant_tools")] = no_tools, total - no_tools
    return targets


def run(config: NegativesConfig, log=print, prepared=None) -> dict:
    started = time.monotonic()
    tasks, catalog_lists, probe = prepared or preflight(config)
    start_output(config.output, config.storage)
    records, material = Tally(), {k: [] for k in ("tool_query", "tool_list", "general_query", "positive")}
    quarantine = ShardWriter(config.output, config.storage, sample_schema)
    log(f"[negatives] reading material: {len(tasks)} read tasks -> {config.output}")
    if tasks:
        dataset = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=len(tasks))
        for row in dataset.map(material_task, fn_kwargs={"config": config}).iter_rows():
            records.merge(row["stats"])
            for item in json.loads(row["material"]):
                material[item["kind"]].append(item)
            for bad in json.loads(row["quarantined"]):
                quarantine.add(QUARANTINE, bad)
    material["tool_list"] += catalog_lists
    cases_tally = Counter()

    positives = pick_positives(material, config)
    ids = {p["id"] for p in positives}
    material["tool_query"] = [q for q in material["tool_query"] if q["id"] not in ids]
    targets = targets_of(config)
    cases = plan_cases(material, targets, config.llm_queries, config.seed, config.agent_h_tool_share,
                       config.queries_per_request, frozenset(list_id(p["tools"]) for p in positives))
    cases_tally["planned"] = len(cases)
    llm = config.llm
    usage: Counter = Counter()
    price = price_per_1k(llm.prices, probe.model)
    with LLMPass(config, probe) as stage:
        cases = write_queries(stage, cases, usage, cases_tally, log)
        kept, dedupe_report = deduplicate(cases, positives, config, cases_tally)
        chosen = trim(kept, targets, cases_tally)
        agent_h_rows = [row for case in chosen if case.side == "agent_h"
                        for row in agent_h.rows(case.id, case.scenario, case.query, case.tools, "no_call",
                                                case.query_source)]
        agent_h_rows += [row for p in positives
                         for row in agent_h.rows(f"agent_h-positive-{p['id']}", "positive", p["text"], p["tools"],
                                                 p["call"], p["source"])]
        train = [case for case in chosen if case.side == "train"]
        answers = Tally()
        writer = ShardWriter(config.output, config.storage,
                             lambda folder: DROPPED_SCHEMA if folder == DROPPED else sample_schema(folder))
        if train:
            answer_cases(stage, train, writer, answers, usage, price, log)
    files = {**quarantine.close(), **writer.close()}
    files[f"{AGENT_H}/part-00000.jsonl"] = write_jsonl(config, f"{AGENT_H}/part-00000.jsonl", agent_h_rows)
    records.files = files
    for source, counts in answers.records.items():  # the training cases, as one more "source"
        records.records[source].update(counts)
        records.reasons[source].update(answers.reasons[source])
    manifest = build_manifest(
        NAME, config, records,
        cases={**{k: cases_tally[k] for k in sorted(cases_tally)},
               "targets": {f"{side}/{scenario}": n for (side, scenario), n in sorted(targets.items())},
               "chosen": dict(sorted(Counter(f"{c.side}/{c.scenario}/{c.query_source}" for c in chosen).items())),
               "deduplication": dedupe_report},
        agent_h={"cases": sum(1 for c in chosen if c.side == "agent_h"), "positives": len(positives),
                 "rows": len(agent_h_rows), "file": f"{AGENT_H}/part-00000.jsonl"},
        material=dict(sorted(records.extra["material"].items())),
        llm={"model": probe.model, "prompt_version": PROMPT_VERSION,
             **{k: usage[k] for k in ("requests", "cached", "reasks", "prompt_tokens", "completion_tokens")},
             "cost_usd": round(cost(usage, price), 6)},
        seconds=round(time.monotonic() - started, 3),
    )
    finish_output(config.output, config.storage, FOLDERS, manifest)
    counts = answers.records.get("cases", Counter())
    log(f"[negatives] done in {manifest['seconds']:.1f}s: {counts['written']:,} negatives written, "
        f"{counts['quarantined']:,} dropped, {counts['dead_lettered']:,} dead letters; "
        f"{manifest['agent_h']['rows']:,} Agent-H rows")
    return manifest


def pick_positives(material: dict, config: NegativesConfig) -> list[dict]:
    """Positive controls (real first calls), seeded; their tool lists are then held out as well."""
    from agentflan_ray.aligning.split import unit_hash

    ordered = sorted(material["positive"], key=lambda p: unit_hash(config.seed, p["id"], "positive"))
    return ordered[: config.positives]


def deduplicate(cases: list[Case], positives: list[dict], config: NegativesConfig, tally: Counter):
    """Exact and near-duplicate queries removed over the positives and both sides (Agent-H first)."""
    from agentflan_ray.negatives.dedupe import dedupe

    ordered = sorted((c for c in cases if c.query), key=lambda c: (SIDES.index(c.side), c.id))
    texts = [p["text"] for p in positives] + [c.query for c in ordered]
    result = dedupe(texts, threshold=config.dedupe_threshold, seed=config.seed)
    offset = len(positives)
    kept = [ordered[i - offset] for i in result.kept if i >= offset]
    tally["duplicate_exact"], tally["duplicate_near"] = result.exact, result.near
    report = {"queries": len(texts), "exact": result.exact, "near": result.near,
              "share_removed": round(result.share_removed, 4), "threshold": config.dedupe_threshold}
    return kept, report


def trim(kept: list[Case], targets: dict, tally: Counter) -> list[Case]:
    """Each (side, scenario) cut to its target, in case order; the rest is surplus."""
    chosen, taken = [], Counter()
    for case in kept:
        key = (case.side, case.scenario)
        if taken[key] < targets.get(key, 0):
            taken[key] += 1
            chosen.append(case)
    tally["surplus"] = len(kept) - len(chosen)
    tally["short"] = sum(max(n - taken[k], 0) for k, n in targets.items())
    return chosen


class LLMPass:
    """The budget for both LLM passes of the job, and a ``map`` of rows through the LLM stage in order."""

    def __init__(self, config: NegativesConfig, probe):
        self.config, self.probe, self.budget = config, probe, None

    def __enter__(self):
        from agentflan_ray.llm.budget import create_budget

        llm = self.config.llm
        self.budget = create_budget(llm.rpm, llm.tpm, llm.burst_s, llm.learn_limits)
        context = ray.data.DataContext.get_current()
        self.preserve_order = context.execution_options.preserve_order
        context.execution_options.preserve_order = True
        return self

    def __exit__(self, *exc):
        ray.data.DataContext.get_current().execution_options.preserve_order = self.preserve_order

    def map(self, rows: list[dict], schema: pa.Schema, task, out_schema: pa.Schema):
        from agentflan_ray.llm.client import Secret
        from agentflan_ray.llm.stage import LLMStage

        llm = self.config.llm
        blocks = max(1, min(len(rows) // max(llm.batch_size, 1) + 1, 64))
        dataset = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=schema)).repartition(blocks)
        results = dataset.map_batches(
            LLMStage, fn_constructor_kwargs={"task": task, "schema": out_schema, "llm": llm, "storage": self.config.storage,
                                             "cache_uri": join(self.config.output, "llm_cache"), "budget": self.budget,
                                             "api_key": Secret(self.probe.api_key)},
            batch_size=llm.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=llm.actors),
            num_cpus=0.25, scheduling_strategy="SPREAD")
        return results.iter_batches(batch_format="pyarrow", batch_size=None)


def write_queries(stage: LLMPass, cases: list[Case], usage: Counter, tally: Counter, log) -> list[Case]:
    """The cases without a real query, grouped by request, written by the LLM; failed ones dropped."""
    from agentflan_ray.llm.stage import account_rows

    groups: dict[tuple, list[Case]] = {}
    per = stage.config.queries_per_request
    for case in cases:
        if not case.query:
            key = (case.side, case.scenario, json.dumps(case.writer_tools, sort_keys=True))
            groups.setdefault(key, [[]])
            if len(groups[key][-1]) == per:
                groups[key].append([])
            groups[key][-1].append(case)
    requests = [{"ids": [c.id for c in group], "case": json.dumps(group[0].to_row())}
                for chunks in groups.values() for group in chunks]
    if not requests:
        return cases
    log(f"[negatives] writing {sum(len(r['ids']) for r in requests):,} queries in {len(requests):,} requests")
    from agentflan_ray.negatives.tasks import QueryTask

    written, pass_tally = {}, Tally()
    for table in stage.map(requests, WRITER_SCHEMA, QueryTask(), QUERY_RESULT_SCHEMA):
        account_rows(table, pass_tally, "query_requests")
        for row in table.to_pylist():
            if row["status"] == "ok":
                written[row["id"]] = row["query"]
            else:
                tally[f"query_{row['status']}"] += len(row["id"].split(","))
    usage.update(pass_tally.extra["llm"])
    for case in cases:
        if not case.query:
            case.query = written.get(case.id, "")
    tally["llm_queries_written"] = len(written)
    return [c for c in cases if c.query]


def answer_cases(stage: LLMPass, train: list[Case], writer: ShardWriter, answers: Tally, usage: Counter, price,
                 log) -> None:
    from agentflan_ray.llm.stage import account_rows, cost_line
    from agentflan_ray.negatives.tasks import AnswerTask

    log(f"[negatives] answering {len(train):,} training cases with {stage.probe.model}")
    pass_tally = Tally()
    progress = Progress(NAME, len(train), "cases answered", log, stage.config.progress,
                        detail=lambda t: cost_line(t, price))
    for table in stage.map([c.to_row() for c in train], CASE_SCHEMA, AnswerTask(stage.probe.model), RESULT_SCHEMA):
        done = account_rows(table, pass_tally, "cases")
        for row in table.to_pylist():
            answers.read("cases")
            if row["status"] == "written":
                answers.outcome("cases", "written")
                writer.add(STREAM, row)
            elif row["status"] == "dropped":
                answers.outcome("cases", "quarantined", f"answer_{row['reason']}")
                writer.add(DROPPED, {"id": row["source_id"], "scenario": row["scenario"], "query": row["query"],
                                     "reason": row["reason"]})
            else:
                answers.outcome("cases", "dead_lettered", row["reason"].split(":", 1)[0])
                writer.add(DROPPED, {"id": row["source_id"], "scenario": row["scenario"], "query": row["query"],
                                     "reason": row["reason"]})
        progress.update(pass_tally, done)
    usage.update(pass_tally.extra["llm"])


def write_jsonl(config: NegativesConfig, relative: str, rows: list[dict]) -> int:
    fs, base = filesystem(config.output, config.storage)
    path = posixpath.join(base, relative)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        for row in sorted(rows, key=lambda r: r["id"]):
            out.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode())
    return len(rows)


def succeeded(manifest: dict) -> bool:
    return all_accounted(manifest["counts"])

