"""The `pipeline` job: generate (with the rewrite), negatives, train and eval in order, as one submission.

    agentflan-ray pipeline --config jobs/configs/pipeline_demo.yaml
    ray job submit ... -- python jobs/pipeline.py --config jobs/configs/pipeline.yaml output=s3://bucket/run7

Each stage is the job of the same name, run with its own section of this config and writing its own
root under ``output``::

    <output>/generate     generate (samples per stream; the rewrite's queue and cache)
    <output>/negatives    negatives (the `negative` stream, dropped cases, the held-out Agent-H set)
    <output>/train        train (data = both roots above; checkpoints/<run_name>-<config digest>/,
                          model/ the exported model, manifest.json): a rerun after a crash resumes
                          from the checkpoints, a changed setting trains anew
    <output>/eval         eval of train's model on the Agent-H set, the sets listed in eval.sets, and
                          with generate.eval_holdout the tool_call and instruct suites built from
                          the ToolBench trajectories generate kept out of training (eval_sets/)
    <output>/pipeline.json    per finished stage: its config hash, the digest of its manifest and of
                              the manifests it read; a rerun skips a stage whose manifest still
                              matches all three (a crash in training does not redo generation;
                              changing a training setting reruns train and eval only)
    <output>/manifest.json    written last: which stages ran or were skipped, and the summary

What the stages share comes from the top of this config: ``storage``, ``placement``, ``progress``,
and ``llm`` (merged under each LLM stage's own ``llm``). ``simulator: true`` starts the bundled
OpenAI-compatible simulator on the driver and points every LLM stage at it, and ``tiny_model`` makes
a tiny Llama-style model from the generated data to train (both for the demo, no network).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from agentflan_ray.config import ConfigError, JobConfig, build, config_hash
from agentflan_ray.storage import filesystem, is_s3, join, sha256
from agentflan_ray.writing.accounting import Tally
from agentflan_ray.writing.manifest import (
    MANIFEST,
    build_manifest,
    finish_output,
    read_manifest,
    sample_files,
    start_output,
)

NAME = "pipeline"
STAGES = ("generate", "negatives", "train", "eval")
UPSTREAM = {"generate": (), "negatives": (), "train": ("generate", "negatives"), "eval": ("train", "negatives")}
STATE = "pipeline.json"
LLM_STAGES = ("generate", "negatives", "eval")
SIMULATOR_KEY = "sk-local-simulator"
SIMULATOR_MODEL = "sim-gpt-4"
SIMULATOR_URL = "http://simulator/v1"  # in the configs that are hashed: its real port changes every run
UNHASHED = ("progress", "ray_address")  # how a stage is watched, not what it makes


class StageFailed(RuntimeError):
    pass


@dataclass
class PipelineConfig(JobConfig):
    """The `pipeline` job (see the module docstring)."""

    output: str = "./out/pipeline"
    stages: list[Literal["generate", "negatives", "train", "eval"]] = field(default_factory=lambda: list(STAGES))
    llm: dict = field(default_factory=dict)  # merged under generate.llm, negatives.llm and eval.llm
    simulator: bool = False  # demo: the bundled simulator on the driver as every stage's LLM
    tiny_model: str = ""  # demo: a local directory to make a tiny model in, from the generated data
    generate: dict = field(default_factory=dict)
    negatives: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    def validate(self, key: str = "") -> None:
        if not self.stages:
            raise ConfigError("stages: at least one stage")
        if is_s3(self.tiny_model):
            raise ConfigError(f"tiny_model: must be a local directory, got {self.tiny_model!r}")
        stage_configs(self, base_url=SIMULATOR_URL if self.simulator else "")  # every section builds


Config = PipelineConfig


def module(stage: str):
    from agentflan_ray.cli import JOBS

    return importlib.import_module(JOBS[stage][0])


def merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``, nested mappings merged key by key."""
    result = copy.deepcopy(base)
    for key, value in top.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


def root(config: PipelineConfig, stage: str) -> str:
    return join(config.output, stage)


def stage_data(config: PipelineConfig, stage: str, base_url: str = "") -> dict:
    """The plain config of one stage: its section, with what the pipeline decides filled in."""
    shared = {"storage": asdict(config.storage), "placement": asdict(config.placement),
              "progress": config.progress, "ray_address": config.ray_address}
    data = merged(getattr(config, stage), {**shared, "output": root(config, stage)})
    if stage in LLM_STAGES and stage != "eval":
        data["llm"] = merged(config.llm, data.get("llm", {}))
        if base_url:
            data["llm"].update(base_url=base_url, model=SIMULATOR_MODEL)
    if stage == "negatives":
        data.setdefault("inputs", config.generate.get("inputs", []))
        data.setdefault("eval_holdout", config.generate.get("eval_holdout", 0.0))
        data.setdefault("eval_holdout_seed", config.generate.get("seed", 0))
    if stage == "train":
        data.setdefault("data", [root(config, s) for s in ("generate", "negatives") if s in config.stages])
        data.update(storage_path=join(root(config, "train"), "checkpoints"), export_dir=join(root(config, "train"), "model"))
        if config.tiny_model:
            data["model"] = os.path.abspath(config.tiny_model)
    if stage == "eval":
        if not data.get("endpoint"):  # else an endpoint is evaluated (a served copy of the model, say)
            data.setdefault("model", join(root(config, "train"), "model"))
        else:
            data["llm"] = merged(config.llm, data.get("llm", {}))
        if "negatives" in config.stages:
            data["sets"] = [join(root(config, "negatives"), "agent_h"), *data.get("sets", [])]
        if uses_held_out_sets(config):
            data["sets"] = [*data.get("sets", []), held_out_sets(config)]
    return data


def uses_held_out_sets(config: PipelineConfig) -> bool:
    return "generate" in config.stages and bool(config.generate.get("eval_holdout"))


def held_out_sets(config: PipelineConfig) -> str:
    """The tool_call and instruct suites built from the ToolBench trajectories generate kept out."""
    return join(config.output, "eval_sets", "held_out.jsonl")


def write_held_out_sets(config: PipelineConfig, log) -> None:
    from agentflan_ray.evaluating.build import generate_holdout, write_sets

    holdout = generate_holdout(root(config, "generate"), config.storage)
    counts = write_sets(holdout["toolbench_inputs"], held_out_sets(config), config.storage, holdout["seed"],
                        holdout["share"])
    log(f"[pipeline] eval sets from the {sum(holdout['held_out_for_eval'].values())} held-out trajectories: "
        + ", ".join(f"{n} {suite} cases" for suite, n in counts.items()))


def stage_configs(config: PipelineConfig, base_url: str = "") -> dict:
    """Every stage's typed config, built (and so checked) before the first stage starts."""
    configs = {}
    for stage in config.stages:
        try:
            configs[stage] = build(module(stage).Config, stage_data(config, stage, base_url), stage)
        except ConfigError as exc:
            raise ConfigError(str(exc) if str(exc).startswith(stage) else f"{stage}: {exc}") from None
    if "train" in configs:  # a rerun after a crash resumes from its checkpoints; a changed setting starts anew
        train = configs["train"]
        configs["train"] = replace(train, run_name=f"{train.run_name}-{digest(train, ('run_name',))[:8]}")
    return configs


def digest(stage_config, leave_out: tuple[str, ...] = ()) -> str:
    """What a stage makes depends on: its resolved config, less how it is watched."""
    return config_hash(stage_config, (*UNHASHED, *leave_out))


def preflight(config: PipelineConfig) -> None:
    """Only the configs (built in ``validate``): each stage's own preflight runs when it starts, since
    its inputs are the earlier stages' outputs."""
    return None


def run(config: PipelineConfig, log=print, prepared=None) -> dict:
    started = time.monotonic()
    with simulator(config, log) as base_url:
        configs = stage_configs(config, base_url)
        hashed = stage_configs(config, SIMULATOR_URL) if config.simulator else configs
        state = read_state(config)
        outcome = {}
        for stage in config.stages:
            key = stage_key(config, stage, hashed[stage])
            if finished(config, stage, key, state):
                log(f"[pipeline] {stage}: skipped (its manifest matches config {key['config_hash']} and its inputs)")
                outcome[stage] = "skipped"
                continue
            log(f"[pipeline] {stage}: running -> {root(config, stage)}")
            state.pop(stage, None)  # later stages see its new manifest as a changed input
            write_state(config, state)
            if stage == "train" and config.tiny_model:
                make_tiny(config, log)
            if stage == "eval" and uses_held_out_sets(config):
                write_held_out_sets(config, log)
            run_stage(stage, configs[stage], log)
            state[stage] = {**key, "manifest_sha256": manifest_digest(config, stage)}
            write_state(config, state)
            outcome[stage] = "ran"
    summary = summarize(config, outcome)
    summary["seconds"] = round(time.monotonic() - started, 3)
    start_output(config.output, config.storage)
    manifest = build_manifest(NAME, config, Tally(), stages=outcome, summary=summary)
    finish_output(config.output, config.storage, (), manifest)
    log("[pipeline] summary " + json.dumps(summary, default=str))
    return manifest


def run_stage(stage: str, stage_config, log) -> None:
    job = module(stage)
    prepared = job.preflight(stage_config)
    result = job.run(stage_config, log=log, prepared=prepared)
    if not job.succeeded(result):
        raise StageFailed(f"{stage}: did not finish (see its output above); later stages not run")


def stage_key(config: PipelineConfig, stage: str, stage_config) -> dict:
    """What a finished stage must match to be skipped: its resolved config and its inputs' manifests."""
    inputs = {s: manifest_digest(config, s) for s in UPSTREAM[stage] if s in config.stages}
    return {"config_hash": digest(stage_config), "inputs": inputs}


def finished(config: PipelineConfig, stage: str, key: dict, state: dict) -> bool:
    recorded = state.get(stage)
    if not recorded or any(recorded.get(k) != v for k, v in key.items()):
        return False
    return recorded.get("manifest_sha256") == manifest_digest(config, stage) is not None


def manifest_digest(config: PipelineConfig, stage: str) -> str | None:
    try:
        return sha256(join(root(config, stage), MANIFEST), config.storage)
    except (FileNotFoundError, OSError):
        return None


def read_state(config: PipelineConfig) -> dict:
    fs, base = filesystem(config.output, config.storage)
    try:
        with fs.open_input_stream(posixpath.join(base, STATE)) as f:
            return json.loads(f.read()).get("stages", {})
    except (FileNotFoundError, OSError, ValueError):
        return {}


def write_state(config: PipelineConfig, state: dict) -> None:
    fs, base = filesystem(config.output, config.storage)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(posixpath.join(base, STATE)) as out:
        out.write(json.dumps({"stages": state}, indent=2).encode() + b"\n")


def make_tiny(config: PipelineConfig, log) -> None:
    from agentflan_ray.training.tiny_model import make_tiny_model

    if "generate" not in config.stages:
        raise ConfigError("tiny_model: needs the generate stage (the model's tokenizer is trained on its data)")
    make_tiny_model(root(config, "generate"), config.tiny_model, hidden=64, layers=2, vocab_size=1000,
                    storage=config.storage)
    log(f"[pipeline] tiny model made from the generated data in {config.tiny_model}")


@contextlib.contextmanager
def simulator(config: PipelineConfig, log):
    """With ``simulator: true``, the bundled simulator on 127.0.0.1 (a demo on one machine); its URL."""
    if not config.simulator:
        yield ""
        return
    from agentflan_ray.llm.simulator import SimulatorConfig, SimulatorServer

    os.environ.setdefault("OPENAI_API_KEY", SIMULATOR_KEY)
    server = SimulatorServer(SimulatorConfig(port=0, latency_s=0.05, api_key=os.environ["OPENAI_API_KEY"]))
    base_url = server.start()
    log(f"[pipeline] simulator serving {SIMULATOR_MODEL} at {base_url}")
    try:
        yield base_url
    finally:
        server.stop()


def summarize(config: PipelineConfig, outcome: dict) -> dict:
    """From the stages' manifests (so skipped stages count too): samples per stream, trained tokens,
    final loss, H_Score and tool-use accuracy, what the LLM calls cost."""
    summary, cost = {"stages": outcome}, 0.0
    for stage in config.stages:
        manifest = read_manifest(root(config, stage), config.storage, stage)
        if stage in ("generate", "negatives"):
            streams = Counter()
            with contextlib.suppress(FileNotFoundError):  # every record quarantined: no sample shard
                for stream, _, rows in sample_files(root(config, stage), config.storage):
                    streams[stream] += rows
            summary[f"{stage}_samples"] = dict(sorted(streams.items()))
            summary[f"{stage}_quarantined"] = manifest["counts"]["quarantined"]
        if stage == "train":
            summary["trained_tokens"] = sum(manifest["data"]["trained_tokens"].values())
            summary["steps"] = manifest["steps"]
            summary["final_loss"] = manifest["metrics"].get("loss")
            summary["model"] = manifest.get("export_dir")
        if stage == "eval":
            scores = manifest["scores"]
            summary["H_Score"] = scores.get("agent_h", {}).get("H_Score")
            summary["correct_by_group"] = {g: s["correct"] for g, s in scores["groups"].items()}
            summary["argument_accuracy_by_group"] = {g: s["argument_accuracy"] for g, s in scores["groups"].items()
                                                     if s.get("argument_accuracy") is not None}
        for section in (manifest.get("rewrite"), manifest.get("llm"), (manifest.get("negatives") or {}).get("llm")):
            if isinstance(section, dict):
                cost += section.get("cost_usd") or 0.0
    summary["cost_usd"] = round(cost, 6)
    return summary


def estimate(config: PipelineConfig, log=print) -> dict:
    """`--estimate`: what the LLM stages would ask of the API (each stage's own estimate); calls
    nothing. Eval's sets come from earlier stages, so it is estimated only when they exist already."""
    configs = stage_configs(config, SIMULATOR_URL if config.simulator else "")
    result, total = {}, 0.0
    for stage in ("generate", "negatives", "eval"):
        if stage not in configs:
            continue
        if stage == "eval" and configs[stage].model:
            log("[pipeline --estimate] eval: a model directory, no API call")
            continue
        try:
            result[stage] = module(stage).estimate(configs[stage], log=log)
        except FileNotFoundError as exc:
            log(f"[pipeline --estimate] {stage}: not estimated before the stages it reads have run ({exc})")
            continue
        found = result[stage].get("cost_usd")
        if found is None:
            found = (result[stage].get("projected") or {}).get("cost_usd", 0.0)
        total += found or 0.0
    result["cost_usd"] = round(total, 2)
    log(f"[pipeline --estimate] LLM calls of the whole pipeline: ${total:,.2f}"
        + (" (simulator: nothing is paid)" if config.simulator else ""))
    return result


def succeeded(manifest: dict) -> bool:
    return all(outcome in ("ran", "skipped") for outcome in manifest["stages"].values())
