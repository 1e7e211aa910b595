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
from agentflan_ray.jobs.generate import InputSpec, drop_held_out_material
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
from agentflan_ray.negatives.settings import ScenarioShares
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
REFILL_ROUNDS = 3  # more LLM-written queries for what deduplication left short, at most this often
DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("scenario", pa.string()), ("query", pa.string()),
                            ("reason", pa.string())])


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
    # The generate run's eval_holdout and seed: the ToolBench trajectories it kept out of training for
    # the tool_call / instruct eval suites give no material here either (the pipeline sets both).
    eval_holdout: float = 0.0
    eval_holdout_seed: int = 0
    llm: LLMConfig = field(default_factory=LLMConfig)
    max_record_bytes: int = 16 * 1024 * 1024
    task_bytes: int = 32 * 1024 * 1024
    estimate_records: int = 1000  # `--estimate` reads the material of at most this many records

    def validate(self, key: str = "") -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input is required")
        for name in ("count", "agent_h_count", "positives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 or more")
        if not 0 <= self.eval_holdout < 1:
            raise ConfigError(f"eval_holdout: must be within [0, 1), got {self.eval_holdout}")
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


@dataclass
class Produced:
    """What one negatives pass made: cases by outcome, the held-out rows, LLM usage."""

    cases: Counter
    targets: dict
    chosen: list[Case]
    positives: list[dict]
    answers: Tally  # the training cases: written, dropped (quarantined) or dead-lettered
    usage: Counter
    dedupe: dict
    agent_h_rows: list[dict]


def read_material(config: NegativesConfig, tasks: list[ReadTask], catalogs: list[dict], records: Tally | None = None,
                  quarantine: ShardWriter | None = None) -> dict[str, list[dict]]:
    """The material of every record (read tasks on Ray); records counted into ``records``, bad ones
    written to ``quarantine`` (both optional: `generate` has counted them already)."""
    material = {k: [] for k in ("tool_query", "tool_list", "general_query", "positive")}
    if tasks:
        dataset = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=len(tasks))
        for row in dataset.map(material_task, fn_kwargs={"config": config}, **config.placement.remote_args()).iter_rows():
            if records is not None:
                records.merge(row["stats"])
            for item in json.loads(row["material"]):
                material[item["kind"]].append(item)
            for bad in json.loads(row["quarantined"]) if quarantine is not None else ():
                quarantine.add(QUARANTINE, bad)
    material["tool_list"] += catalogs
    return material


def produce(config: NegativesConfig, material: dict, probe, write, dropped, log) -> Produced:
    """Plan, write queries, deduplicate, trim, render the held-out rows and answer the training cases:
    each negative sample row goes to ``write(row)``, each dropped or dead-lettered case to ``dropped(row)``."""
    cases_tally = Counter()
    positives = pick_positives(material, config)
    ids = {p["id"] for p in positives}
    material["tool_query"] = [q for q in material["tool_query"] if q["id"] not in ids]
    targets = targets_of(config)
    cases = plan_cases(material, targets, config.llm_queries, config.seed, config.agent_h_tool_share,
                       config.queries_per_request, frozenset(list_id(p["tools"]) for p in positives))
    cases_tally["planned"] = len(cases)
    usage: Counter = Counter()
    price = price_per_1k(config.llm.prices, probe.model)
    answers = Tally()
    held = frozenset(list_id(p["tools"]) for p in positives)
    with LLMPass(config, probe) as stage:
        cases = write_queries(stage, cases, usage, cases_tally, log)
        considered = len(cases)
        kept = deduplicate(cases, positives, config, cases_tally)
        chosen = trim(kept, targets, cases_tally)
        for round_ in range(1, REFILL_ROUNDS + 1):  # duplicates removed more than the oversampling covered
            short = {key: n - sum(1 for c in chosen if (c.side, c.scenario) == key) for key, n in targets.items()}
            short = {key: n for key, n in short.items() if n > 0}
            if not short:
                break
            log(f"[negatives] round {round_}: {sum(short.values()):,} cases short after deduplication; writing more")
            extra = plan_cases(material, short, 1.0, config.seed + round_, config.agent_h_tool_share,
                               config.queries_per_request, held, prefix=f"r{round_}-")
            cases_tally["planned"] += len(extra)
            extra = write_queries(stage, extra, usage, cases_tally, log)
            considered += len(extra)
            kept = deduplicate(kept + extra, positives, config, cases_tally)
            chosen = trim(kept, targets, cases_tally)
        removed = cases_tally["duplicate_exact"] + cases_tally["duplicate_near"]
        dedupe_report = {"queries": considered, "exact": cases_tally["duplicate_exact"],
                         "near": cases_tally["duplicate_near"], "share_removed": round(removed / max(considered, 1), 4),
                         "threshold": config.dedupe_threshold}
        agent_h_rows = [row for case in chosen if case.side == "agent_h"
                        for row in agent_h.rows(case.id, case.scenario, case.query, case.tools, "no_call",
                                                case.query_source)]
        agent_h_rows += [row for p in positives
                         for row in agent_h.rows(f"agent_h-positive-{p['id']}", "positive", p["text"], p["tools"],
                                                 p["call"], p["source"])]
        train = [case for case in chosen if case.side == "train"]
        if train:
            answer_cases(stage, train, write, dropped, answers, usage, price, log)
    return Produced(cases_tally, targets, chosen, positives, answers, usage, dedupe_report, agent_h_rows)


def run(config: NegativesConfig, log=print, prepared=None) -> dict:
    started = time.monotonic()
    tasks, catalog_lists, probe = prepared or preflight(config)
    start_output(config.output, config.storage)
    records = Tally()
    quarantine = ShardWriter(config.output, config.storage, sample_schema)
    log(f"[negatives] reading material: {len(tasks)} read tasks -> {config.output}")
    material = read_material(config, tasks, catalog_lists, records, quarantine)
    left_out = drop_held_out_material(material, config.eval_holdout_seed, config.eval_holdout)
    writer = ShardWriter(config.output, config.storage,
                         lambda folder: DROPPED_SCHEMA if folder == DROPPED else sample_schema(folder))
    made = produce(config, material, probe, lambda row: writer.add(STREAM, row), lambda row: writer.add(DROPPED, row),
                   log)
    files = {**quarantine.close(), **writer.close()}
    files[f"{AGENT_H}/part-00000.jsonl"] = write_jsonl(config, f"{AGENT_H}/part-00000.jsonl", made.agent_h_rows)
    records.files = files
    merge_cases(records, made.answers)
    manifest = build_manifest(NAME, config, records, **report(made, config, probe.model),
                              material={**dict(sorted(records.extra["material"].items())),
                                        "held_out_for_eval": left_out},
                              seconds=round(time.monotonic() - started, 3))
    finish_output(config.output, config.storage, FOLDERS, manifest)
    counts = made.answers.records.get("cases", Counter())
    log(f"[negatives] done in {manifest['seconds']:.1f}s: {counts['written']:,} negatives written, "
        f"{counts['quarantined']:,} dropped, {counts['dead_lettered']:,} dead letters; "
        f"{manifest['agent_h']['rows']:,} Agent-H rows")
    return manifest


def merge_cases(records: Tally, answers: Tally, source: str = "cases") -> None:
    """The training cases join the manifest's counts as one more source."""
    records.records[source].update(answers.records.get("cases", Counter()))
    records.reasons[source].update(answers.reasons.get("cases", Counter()))


def report(made: Produced, config: NegativesConfig, model: str) -> dict:
    price = price_per_1k(config.llm.prices, model)
    return {
        "cases": {**{k: made.cases[k] for k in sorted(made.cases)},
                  "targets": {f"{side}/{scenario}": n for (side, scenario), n in sorted(made.targets.items())},
                  "chosen": dict(sorted(Counter(f"{c.side}/{c.scenario}/{c.query_source}" for c in made.chosen).items())),
                  "deduplication": made.dedupe},
        "agent_h": {"cases": sum(1 for c in made.chosen if c.side == "agent_h"), "positives": len(made.positives),
                    "rows": len(made.agent_h_rows), "file": f"{AGENT_H}/part-00000.jsonl"},
        "llm": {"model": model, "prompt_version": PROMPT_VERSION,
                **{k: made.usage[k] for k in ("requests", "cached", "reasks", "prompt_tokens", "completion_tokens")},
                "cost_usd": round(cost(made.usage, price), 6)},
    }


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
    tally["duplicate_exact"] += result.exact
    tally["duplicate_near"] += result.near
    return kept


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
            num_cpus=0.25, scheduling_strategy="SPREAD", **self.config.placement.remote_args())
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


def answer_cases(stage: LLMPass, train: list[Case], write, dropped, answers: Tally, usage: Counter, price,
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
                write(row)
                continue
            if row["status"] == "dropped":
                answers.outcome("cases", "quarantined", f"answer_{row['reason']}")
            else:
                answers.outcome("cases", "dead_lettered", row["reason"].split(":", 1)[0])
            dropped({"id": row["source_id"], "scenario": row["scenario"], "query": row["query"], "reason": row["reason"]})
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



ANSWER_TOKENS, QUERY_TOKENS = 150, 30  # assumed completion tokens per answer and per written query


def estimate(config: NegativesConfig, log=print) -> dict:
    """`--estimate`: requests, tokens, cost and time of a run, from the real prompts of material read
    from the first records of the input (``estimate_records`` at most); no API call."""
    import math

    from agentflan_ray.jobs.estimate import estimate_tokens
    from agentflan_ray.llm.client import resolve_endpoint
    from agentflan_ray.negatives.prompts import answer_messages, queries_messages
    from agentflan_ray.negatives.tasks import brief

    tasks, unmatched = plan_read_tasks(config)
    if unmatched:
        raise FileNotFoundError("inputs: " + "; ".join(f"{path} matched no file" for path in unmatched))
    material = {"tool_query": [], "general_query": [], "tool_list": list(read_catalogs(config))}
    seen = 0
    for piece in (p for t in tasks for p in t.ranges if not p.problem):
        for raw in iter_raw_records(piece, config):
            if seen >= config.estimate_records:
                break
            seen += 1
            try:
                found = material_of(parse_record(piece.format, raw.value, piece.source, record_id(raw.value, raw.where),
                                                 Counter())) if not raw.error else []
            except (RecordError, RecursionError):
                found = []
            for item in found:
                material.setdefault(item["kind"], []).append(item)
    queries = [m["text"] for m in material["tool_query"] + material["general_query"]] or ["a typical request"]
    lists = [brief(m["tools"]) for m in material["tool_list"]] or [[]]
    answer_prompt = sum(estimate_tokens(json.dumps(answer_messages("irrelevant_tools", lists[i % len(lists)], q)))
                        for i, q in enumerate(queries)) / len(queries)
    query_prompt = sum(estimate_tokens(json.dumps(queries_messages("no_tools", tools, config.queries_per_request)))
                       for tools in lists) / len(lists)
    wanted = (config.count + config.agent_h_count) * 1.5  # cases are oversampled by half for deduplication
    query_requests = math.ceil(wanted * config.llm_queries / config.queries_per_request)
    usage = {"prompt_tokens": round(config.count * answer_prompt + query_requests * query_prompt),
             "completion_tokens": config.count * ANSWER_TOKENS
             + query_requests * config.queries_per_request * QUERY_TOKENS}
    _, model = resolve_endpoint(config.llm)
    price = price_per_1k(config.llm.prices, model)
    requests = config.count + query_requests
    result = {"requests": requests, "answer_requests": config.count, "query_requests": query_requests, **usage,
              "cost_usd": round(cost(usage, price), 2), "model": model, "sampled_records": seen,
              "minutes_at_rpm": round(requests / config.llm.rpm, 1) if config.llm.rpm else None}
    log(f"[negatives --estimate] {requests:,} requests ({config.count:,} answers + {query_requests:,} query-writing "
        f"requests, at least: more when real queries run short), {usage['prompt_tokens']:,} prompt + "
        f"{usage['completion_tokens']:,} completion tokens (completions assumed {ANSWER_TOKENS} per answer, "
        f"{QUERY_TOKENS} per query), ${result['cost_usd']:,.2f} with {model}; no API call made")
    return result
