"""The `eval` job: tool-call hallucination (Agent-H) and tool-use accuracy of a model or an endpoint.

    agentflan-ray eval --config jobs/configs/eval_demo.yaml
    agentflan-ray eval --config my.yaml model=./model-out sets=[s3://bucket/neg/agent_h]
    agentflan-ray eval --config my.yaml endpoint=http://vllm:8000/v1 model_name=my-model [native_tools=off]
    agentflan-ray eval --config my.yaml --estimate      # cases, requests, tokens, cost, time; runs nothing
    agentflan-ray eval-sets --toolbench "data/toolbench/**/*.json" --output sets.jsonl   # tool_call, instruct

Read top to bottom::

    preflight       the sets listed; the model directory checked, or the endpoint's key and model, and
                    (native_tools=auto) whether it takes tools=, with one small request
    read sets       rows {id, suite, protocol, messages, tools, expect[, format]}; bad rows quarantined
    replies         endpoint: map_batches(LLMStage, EndpointTask) under the budget and cache; the tools
                    of general cases passed as tools= when native (an HTTP 400 to that: asked again as
                    text, counted as a fallback); model: map_batches(HFGenerate) on an actor pool,
                    batched greedy generation
    judge           code, not an LLM: ``evaluating.judge.find_call`` on every reply and its tool_calls;
                    instruct cases by format hit (``format_call``: the asked protocol's rule alone),
                    then name and arguments of that call
    report          report.json, report.md (the paper's rows beside ours), cases/part-00000.parquet,
                    then the manifest, last
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import ray

from agentflan_ray.config import ConfigError, JobConfig
from agentflan_ray.evaluating.report import deltas, markdown, score
from agentflan_ray.evaluating.sets import read_sets, tool_names
from agentflan_ray.llm.settings import LLMConfig, cost, price_per_1k
from agentflan_ray.storage import expand, filesystem, join, s3_endpoint, sha256
from agentflan_ray.writing.accounting import Progress, Tally, all_accounted
from agentflan_ray.writing.manifest import build_manifest, finish_output, start_output
from agentflan_ray.writing.shards import QUARANTINE, ShardWriter

NAME = "eval"
CASES = "cases"
FOLDERS = (CASES, QUARANTINE)
SOURCE = "cases"
CASE_SCHEMA = pa.schema([
    ("id", pa.string()), ("suite", pa.string()), ("protocol", pa.string()), ("reply", pa.string()),
    ("finish_reason", pa.string()), ("called", pa.bool_()), ("call_name", pa.string()),
    ("call_arguments", pa.string()), ("rule", pa.string()), ("matched", pa.string()), ("expect", pa.string()),
    ("name_right", pa.bool_()), ("arguments_right", pa.bool_()), ("correct", pa.bool_()), ("error", pa.string()),
    ("format_hit", pa.bool_()), ("reply_tool_calls", pa.string()), ("native", pa.string()),
])
BAD_SCHEMA = pa.schema([("where", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("row", pa.string())])


@dataclass
class EvalLLMConfig(LLMConfig):
    """The endpoint settings with an evaluation's defaults, greedy and short, which a config giving
    only some ``llm.*`` keys keeps."""

    temperature: float = 0.0
    max_tokens: int = 512


@dataclass
class EvalConfig(JobConfig):
    """The `eval` job (see the module docstring)."""

    sets: list[str] = field(default_factory=list)  # JSONL or Parquet files, globs or folders; local or s3://
    output: str = "./out/eval"
    model: str = ""  # a Hugging Face model directory (the train job's export), local or s3://
    endpoint: str = ""  # or an OpenAI-compatible base URL (vLLM, OpenAI, the simulator)
    model_name: str = ""  # the endpoint's model
    llm: EvalLLMConfig = field(default_factory=EvalLLMConfig)
    max_new_tokens: int = 256  # model backend
    batch_size: int = 8  # model backend: cases per generate call; 16+ is faster where memory allows
    actors: int = 1  # model backend
    num_gpus: float = 0.0  # model backend: per actor
    compare: str = ""  # another run's report.json: deltas in the report
    # endpoint: pass general cases' tools as tools= (auto: when the endpoint takes them in preflight);
    # YAML reads a bare on/off as a boolean, taken as "on"/"off"
    native_tools: Literal["auto", "on", "off"] | bool = "auto"

    def validate(self, key: str = "") -> None:
        if not self.sets:
            raise ConfigError("sets: at least one evaluation set is required")
        if bool(self.model) == bool(self.endpoint or self.llm.base_url):
            raise ConfigError("give either model= (a model directory) or endpoint= (an OpenAI-compatible URL)")
        if self.endpoint:
            self.llm.base_url = self.endpoint
        if self.model_name:
            self.llm.model = self.model_name
        if isinstance(self.native_tools, bool):
            self.native_tools = "on" if self.native_tools else "off"
        for name in ("max_new_tokens", "batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be positive")


Config = EvalConfig
# Any of these beside the weights means the model has a tokenizer (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def preflight(config: EvalConfig):
    if not config.storage.endpoint_url:
        config.storage.endpoint_url = s3_endpoint(config.storage)
    missing = [spec for spec in config.sets if not expand(spec, config.storage)]
    if missing:
        raise FileNotFoundError("sets: " + "; ".join(f"{spec} matched no file" for spec in missing))
    if config.model:
        fs, base = filesystem(config.model, config.storage)
        import pyarrow.fs as pafs

        if fs.get_file_info(posixpath.join(base, "config.json")).type != pafs.FileType.File:
            raise FileNotFoundError(f"model: {config.model} is not a Hugging Face model directory (no config.json)")
        names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(base))]
        if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
            raise FileNotFoundError(f"model: {config.model} has a config.json but no weights (*.safetensors or "
                                    "pytorch_model*.bin): a half-copied export?")
        if not any(n in TOKENIZER_FILES or n.endswith(".tiktoken") for n in names):
            raise FileNotFoundError(f"model: {config.model} has weights but no tokenizer ({', '.join(TOKENIZER_FILES)}):"
                                    " save it beside the model with tokenizer.save_pretrained")
        return None
    from agentflan_ray.llm.client import LLMClient

    probe = LLMClient(config.llm)

    async def check() -> bool:  # on one event loop: the client's connections belong to it
        await probe.preflight()
        # auto: one small request offering a tool; an HTTP 400 means the endpoint takes text only
        return config.native_tools == "on" or (config.native_tools == "auto" and await probe.accepts_tools())

    config.native_tools = "on" if asyncio.run(check()) else "off"
    return probe


def run(config: EvalConfig, log=print, prepared=None) -> dict:
    started = time.monotonic()
    probe = prepared if prepared is not None or config.model else preflight(config)
    start_output(config.output, config.storage)
    cases, bad, files = read_sets(config.sets, config.storage)
    tally = Tally()
    for row in bad:
        tally.read(SOURCE)
        tally.outcome(SOURCE, "quarantined", row["reason"])
    log(f"[eval] {len(cases):,} cases ({len(bad):,} quarantined) from {len(files)} files -> {config.output}")
    replies, usage = (generate_hf(config, cases, log) if config.model else ask_endpoint(config, cases, probe, log))
    writer = ShardWriter(config.output, config.storage, lambda f: BAD_SCHEMA if f == QUARANTINE else CASE_SCHEMA)
    for row in bad:
        writer.add(QUARANTINE, row)
    results = []
    for case in cases:
        reply = replies[case["id"]]
        tally.read(SOURCE)
        if reply["error"]:
            tally.outcome(SOURCE, "dead_lettered", reply["error"].split(":", 1)[0])
            writer.add(CASES, {**judged(case, reply), "error": reply["error"]})
            continue
        row = judged(case, reply)
        tally.outcome(SOURCE, "written")
        writer.add(CASES, row)
        results.append({**row, "expect_call": case["expect"] != "no_call"})
    tally.files = writer.close()
    model = {"backend": "model" if config.model else "endpoint",
             "name": config.model or (probe.model if probe else ""), "base_url": "" if config.model else config.llm.base_url}
    native = Counter(reply.get("native") or "" for reply in replies.values())
    if native["fallback"]:
        log(f"[eval] the endpoint rejected tools= (HTTP 400) for {native['fallback']:,} cases: asked as text")
    report = {"model": model, "generation": generation(config), "scores": score(results),
              "sets": [{"path": path, "sha256": sha256(path, config.storage)} for path in files]}
    if config.compare:
        other = read_json(config.compare, config)
        report["compare"] = {"report": config.compare, "deltas": deltas(report["scores"], other.get("scores", {}))}
    write_text(config, "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(config, "report.md", markdown(report, read_json(config.compare, config) if config.compare else None))
    manifest = build_manifest(NAME, config, tally, scores=report["scores"], llm=usage,
                              native_tools={"asked": native["on"] + native["fallback"], "fallback": native["fallback"]},
                              seconds=round(time.monotonic() - started, 3))
    finish_output(config.output, config.storage, FOLDERS, manifest)
    log(markdown(report).split("\n## ")[0])
    if "agent_h" in report["scores"]:
        h = report["scores"]["agent_h"]
        log(f"[eval] H_ReAct {h['H_ReAct']:.1f} · H_General {h['H_General']:.1f} · H_Score {h['H_Score']:.1f}")
    return manifest


def judged(case: dict, reply: dict) -> dict:
    from agentflan_ray.evaluating.judge import find_call, format_call, same_call

    offered = tool_names(case)
    verdict = find_call(reply["reply"], offered, json.loads(reply.get("tool_calls") or "[]"))
    expect, fmt, format_hit, scored = case["expect"], case.get("format"), None, verdict
    if fmt:  # instruct: format hit (a call in the asked protocol), then name and arguments of that call only
        scored = format_call(reply["reply"], fmt)
        format_hit, verdict = scored.called, scored if scored.called else verdict
    if expect == "no_call":
        name_right = arguments_right = False
        correct = not verdict.called
    else:
        name_right, arguments_right = same_call(scored, expect, offered) if scored.called else (False, False)
        correct = name_right and arguments_right
    return {"id": case["id"], "suite": case["suite"], "protocol": case["protocol"], "reply": reply["reply"],
            "finish_reason": reply["finish_reason"], "called": verdict.called, "call_name": verdict.name,
            "call_arguments": json.dumps(verdict.arguments, ensure_ascii=False, sort_keys=True)
            if verdict.arguments is not None else "",
            "rule": verdict.rule, "matched": verdict.matched,
            "expect": expect if isinstance(expect, str) else json.dumps(expect, ensure_ascii=False, sort_keys=True),
            "name_right": name_right, "arguments_right": arguments_right, "correct": correct, "error": "",
            "format_hit": format_hit, "reply_tool_calls": reply.get("tool_calls") or "", "native": reply.get("native") or ""}


def case_rows(cases: list[dict], native: bool = False) -> list[dict]:
    """Rows for a backend; ``native``: the tools of general cases go along, to pass as ``tools=``."""
    return [{"id": c["id"], "messages": json.dumps(c["messages"], ensure_ascii=False),
             "tools": json.dumps(c["tools"], ensure_ascii=False) if native and c["protocol"] == "general" and c["tools"]
             else ""} for c in cases]


def ask_endpoint(config: EvalConfig, cases: list[dict], probe, log) -> tuple[dict, dict]:
    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA, REPLY_SCHEMA, EndpointTask
    from agentflan_ray.llm.budget import create_budget
    from agentflan_ray.llm.client import Secret
    from agentflan_ray.llm.stage import LLMStage, account_rows, cost_line

    llm = config.llm
    price = price_per_1k(llm.prices, probe.model)
    budget = create_budget(llm.rpm, llm.tpm, llm.burst_s, llm.learn_limits)
    replies, asked = {}, Tally()
    if cases:
        blocks = max(1, min(len(cases) // max(llm.batch_size, 1) + 1, 64))
        rows = case_rows(cases, native=config.native_tools == "on")
        dataset = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=CASE_ROW_SCHEMA)).repartition(blocks)
        results = dataset.map_batches(
            LLMStage, fn_constructor_kwargs={"task": EndpointTask(), "schema": REPLY_SCHEMA, "llm": llm,
                                             "storage": config.storage, "cache_uri": join(config.output, "llm_cache"),
                                             "budget": budget, "api_key": Secret(probe.api_key)},
            batch_size=llm.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=llm.actors),
            num_cpus=0.25, scheduling_strategy="SPREAD", **config.placement.remote_args())
        progress = Progress(NAME, len(cases), "cases", log, config.progress, detail=lambda t: cost_line(t, price))
        for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
            done = account_rows(table, asked, SOURCE)
            for row in table.to_pylist():
                replies[row["id"]] = row
            progress.update(asked, done)
    usage = asked.extra["llm"]
    return replies, {"model": probe.model, **{k: usage[k] for k in ("requests", "cached", "reasks", "prompt_tokens",
                                                                       "completion_tokens")},
                     "cost_usd": round(cost(usage, price), 6)}


def generate_hf(config: EvalConfig, cases: list[dict], log) -> tuple[dict, dict]:
    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA, HFGenerate, batch_order

    log(f"[eval] generating with {config.model} ({config.actors} actor(s), batches of {config.batch_size})")
    replies, timing = {}, {}
    if cases:
        # Cases with the same system prompt (and tools) side by side, shorter first: a batch runs a
        # shared prefix once, and its rows are about as long. Blocks of whole batches (at most 64
        # blocks): a block of 7 rows would make batches of 8 and 6 from two of them.
        ordered = pa.Table.from_pylist(sorted(case_rows(cases), key=batch_order), schema=CASE_ROW_SCHEMA)
        rows = config.batch_size * -(-len(cases) // (config.batch_size * 64))
        dataset = ray.data.from_arrow([ordered.slice(start, rows) for start in range(0, len(cases), rows)])
        results = dataset.map_batches(
            HFGenerate, fn_constructor_kwargs={"model": config.model, "storage": config.storage,
                                               "max_new_tokens": config.max_new_tokens},
            batch_size=config.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_gpus=config.num_gpus or None, num_cpus=1)
        progress = Progress(NAME, len(cases), "cases", log, config.progress)
        tally = Tally()
        started, first = time.monotonic(), None  # when the first replies came, and how many
        for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
            first = first or (time.monotonic(), table.num_rows)
            for row in table.to_pylist():
                replies[row["id"]] = row
                tally.read(SOURCE)
            progress.update(tally, table.num_rows)
        timing = generation_timing(started, *first, time.monotonic(), len(cases))
    return replies, {"model": config.model, "requests": 0, **timing}


def generation_timing(started: float, first: float, first_rows: int, done: float, cases: int) -> dict:
    """How long generating took; how long until the first replies reached the driver (starting the
    actors, loading the model, one block); and the rate from those to the last, which the start
    does not dilute (the backend's steady rate)."""
    after = done - first
    return {"generation_s": round(done - started, 3), "first_replies_s": round(first - started, 3),
            "cases_per_s_after_first": round((cases - first_rows) / after, 2) if after > 0 else None}


def estimate(config: EvalConfig, log=print) -> dict:
    """`--estimate`: cases, requests, tokens, cost and time from the sets; no Ray, no API call."""
    from agentflan_ray.evaluating.estimate import estimate_run

    return estimate_run(config, log)


def generation(config: EvalConfig) -> dict:
    if config.model:
        return {"decoding": "greedy", "max_new_tokens": config.max_new_tokens}
    return {"temperature": config.llm.temperature, "max_tokens": config.llm.max_tokens,
            "native_tools": config.native_tools}


def read_json(uri: str, config: EvalConfig) -> dict:
    fs, path = filesystem(uri, config.storage)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_text(config: EvalConfig, name: str, text: str) -> None:
    fs, base = filesystem(config.output, config.storage)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(posixpath.join(base, name)) as out:
        out.write(text.encode())


def succeeded(manifest: dict) -> bool:
    return all_accounted(manifest["counts"])
