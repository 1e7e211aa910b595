"""Typed configuration: YAML plus ``key=value`` overrides, validated before any work starts.

Each stage owns one dataclass. ``load_config(GenerateConfig, "demo.yaml", ["seed=3"])`` reads the
file, applies the overrides (dotted keys reach nested fields, values are parsed as YAML), and builds
the dataclass field by field. Any unknown key or badly typed value raises ``ConfigError`` naming the
key, e.g. ``balance.preset: must be one of ['none', 'paper', 'r10r5u7'], got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


def require_at_least(obj, key: str, names: tuple[str, ...], minimum: int) -> None:
    """``key.name: must be at least N`` (or ``0 or more``) for the first field below ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            raise ConfigError(f"{key + '.' if key else ''}{name}: must be {bound}, got {value}")


INPUT_FORMATS = ("toolbench", "agentinstruct", "agentflan", "sharegpt")
BALANCE_PRESETS = {
    "none": {"reasoning": 1.0, "retrieval": 1.0, "understanding": 1.0},
    "paper": {"reasoning": 1.0, "retrieval": 0.25, "understanding": 0.75},
    "r10r5u7": {"reasoning": 1.0, "retrieval": 0.5, "understanding": 0.7},
}
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
class BalanceConfig:
    """Capability balancing by loss masking: a turn keeps its loss with probability ratio[capability]."""

    preset: Literal["none", "paper", "r10r5u7"] = "r10r5u7"
    # Overrides single ratios of the preset, e.g. {retrieval: 0.3}.
    ratios: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for name, value in self.ratios.items():
            if name not in BALANCE_PRESETS["none"]:
                raise ConfigError(f"{key}.ratios.{name}: unknown capability; use one of {sorted(BALANCE_PRESETS['none'])}")
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.ratios.{name}: must be a number within [0, 1], got {value!r}")

    def resolved(self) -> dict[str, float]:
        return {**BALANCE_PRESETS[self.preset], **{k: float(v) for k, v in self.ratios.items()}}


@dataclass
class StorageConfig:
    """Where s3:// paths go. Credentials come from the usual AWS variables, never from here."""

    endpoint_url: str = ""
    region: str = "us-east-1"


@dataclass
class GenerateConfig:
    inputs: list[InputSpec] = field(default_factory=list)
    output: str = "./out/run1"
    rewrite: Literal["template", "llm"] = "template"
    seed: int = 0
    toolbench_split: ToolBenchSplit = field(default_factory=ToolBenchSplit)
    # Fraction of ToolBench trajectories that also yield one `instruct` (format-following) sample.
    instruct_share: float = 0.05
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
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray_address: str = ""
    progress: bool = True

    def validate(self, key: str = "") -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input is required")
        if not self.output:
            raise ConfigError("output: must not be empty")
        if self.rewrite == "llm":
            raise ConfigError(
                "rewrite: 'llm' is not available in this version yet (the LLM rewrite stage ships with "
                "the rate-limited client); use rewrite=template"
            )
        if not 0.0 <= self.instruct_share <= 1.0:
            raise ConfigError(f"instruct_share: must be within [0, 1], got {self.instruct_share}")
        for name in self.agentinstruct_streams:
            if name not in AGENTINSTRUCT_STREAMS:
                raise ConfigError(f"agentinstruct_streams: unknown stream {name!r}; use {list(AGENTINSTRUCT_STREAMS)}")
        if self.max_record_bytes < 1024:
            raise ConfigError(f"max_record_bytes: must be at least 1024, got {self.max_record_bytes}")
        if self.task_bytes < 1024:
            raise ConfigError(f"task_bytes: must be at least 1024, got {self.task_bytes}")
        if self.task_retries < 0:
            raise ConfigError(f"task_retries: must be 0 or more, got {self.task_retries}")
        if self.row_group_rows < 1:
            raise ConfigError(f"row_group_rows: must be positive, got {self.row_group_rows}")


DEFAULT_PRICES = {
    # USD per 1,000 tokens, matched by the longest model-name prefix; override in config.
    "gpt-4o-mini": {"input": 0.00015, "output": 0.0006},
    "gpt-4o": {"input": 0.0025, "output": 0.01},
    "gpt-4-turbo": {"input": 0.01, "output": 0.03},
    "gpt-4": {"input": 0.03, "output": 0.06},
    "gpt-3.5-turbo": {"input": 0.0005, "output": 0.0015},
    "sim-": {"input": 0.03, "output": 0.06},
}


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat endpoint and how hard to drive it. The key itself never lives here:
    only the name of the environment variable that holds it."""

    base_url: str = ""  # empty: $OPENAI_BASE_URL, else the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"
    model: str = ""  # empty: $OPENAI_MODEL, else gpt-4
    temperature: float = 0.7
    max_tokens: int = 1024
    timeout_s: float = 60.0
    max_attempts: int = 8
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Shared cluster-wide budget; 0 means "none unless the API's x-ratelimit-limit-* headers say so".
    rpm: int = 0
    tpm: int = 0
    learn_limits: bool = True
    burst_s: float = 0.5
    concurrency: int = 64  # requests in flight per actor
    actors: int = 2
    batch_size: int = 256
    prompt_version: str = "v1"
    max_reasks: int = 2
    cache: bool = True
    prices: dict = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def validate(self, key: str) -> None:
        require_at_least(self, key, ("max_tokens", "max_attempts", "concurrency", "actors", "batch_size"), 1)
        require_at_least(self, key, ("rpm", "tpm", "max_reasks"), 0)
        if self.timeout_s <= 0:
            raise ConfigError(f"{key}.timeout_s: must be positive, got {self.timeout_s}")
        for model, price in self.prices.items():
            if not isinstance(price, dict) or set(price) != {"input", "output"}:
                raise ConfigError(f"{key}.prices.{model}: expected {{input: USD per 1k tokens, output: ...}}")


@dataclass
class ChatRunConfig:
    """The `chat` job: answer a file of chat requests through the rate-limited, cached client."""

    input: str = ""  # JSONL or Parquet rows {id, messages, response_format?}; local path, glob or s3://
    output: str = "./out/chat"
    llm: LLMConfig = field(default_factory=LLMConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray_address: str = ""
    progress: bool = True

    def validate(self, key: str = "") -> None:
        if not self.input:
            raise ConfigError("input: required (a JSONL or Parquet file of chat requests)")
        if not self.output:
            raise ConfigError("output: must not be empty")


@dataclass
class TrainConfig:
    """The `train` job: DeepSpeed SFT over generated shards with Ray Train."""

    data: str = ""  # a generate output directory (local or s3://)
    model: str = ""  # a Hugging Face model directory or hub name
    template: Literal["chat_template", "agentflan", "llama2"] = "chat_template"
    max_seq_len: int = 2048
    overlong: Literal["truncate", "drop"] = "truncate"
    # A number, or [min, max] for an elastic run: Ray Train starts with as many workers as the
    # cluster has room for (at least min) and resizes when nodes come or go; the global batch holds.
    num_workers: int | list[int] = 2
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    # auto: on GPU FlashAttention-2 variable-length attention when flash-attn is installed, else
    # PyTorch's FlexAttention with a per-sample block mask; on CPU sdpa with the exact mask.
    attention: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = "auto"
    # auto: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on GPU
    # workers that have liger-kernel installed; liger: required; none: the model's own modules.
    fused_kernels: Literal["auto", "liger", "none"] = "auto"
    # AdamW implementation: auto, torch (fused CUDA kernel on GPU), deepspeed (JIT-built ops).
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"
    # Logical CPUs per training worker; below 1 on small CPU machines leaves room for Ray Data.
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    global_batch: int = 8  # packed sequences per optimizer step
    micro_batch: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    warmup_ratio: float = 0.03
    epochs: int = 3
    max_steps: int = 0  # 0: epochs decide
    log_every: int = 1  # steps between TensorBoard points
    # Seconds between metric reports to Ray Train (each is a barrier; checkpoints always report).
    report_interval_s: float = 10.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # false: no checkpoint at the last step unless checkpoint_every falls on it (throughput trials)
    checkpoint_at_end: bool = True
    # Peak FLOP/s per worker for the MFU figure; 0: looked up from the GPU's name (none on CPU).
    peak_flops_per_worker: float = 0.0
    max_failures: int = 2
    storage_path: str = "./out/checkpoints"
    run_name: str = "agentflan-sft"
    export_dir: str = ""
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray_address: str = ""

    def validate(self, key: str = "") -> None:
        if not self.data:
            raise ConfigError("data: required (a generate output directory)")
        if not self.model:
            raise ConfigError("model: required (a model directory, e.g. from make-tiny-model)")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"zero_stage: must be 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params: needs zero_stage=3 (ZeRO-2 keeps the parameters on the GPU)")
        if self.export_dir and not self.checkpoint_at_end:
            raise ConfigError("checkpoint_at_end: must be true with export_dir (the export is made from it)")
        require_at_least(self, key, ("max_seq_len", "global_batch", "micro_batch", "epochs",
                                     "log_every", "checkpoint_every", "keep_checkpoints"), 1)
        if isinstance(self.num_workers, list) and (len(self.num_workers) != 2 or self.num_workers[0] > self.num_workers[1]):
            raise ConfigError(f"num_workers: a number or [min, max] with min <= max, got {self.num_workers}")
        if self.min_workers < 1:
            raise ConfigError(f"num_workers: must be at least 1, got {self.num_workers}")
        uneven = [n for n in range(self.min_workers, self.max_workers + 1) if self.global_batch % (self.micro_batch * n)]
        if uneven:
            raise ConfigError(f"global_batch: {self.global_batch} is not a multiple of micro_batch x workers for "
                              f"{uneven} workers (micro_batch={self.micro_batch}); the global batch must hold at "
                              f"every size num_workers allows")

    @property
    def block_rows(self) -> int:
        """Rows per dataset block: the largest size that divides every worker's share of a step
        (global_batch / n) at every allowed world size n, so steps never split a block."""
        return math.gcd(*(self.global_batch // n for n in range(self.min_workers, self.max_workers + 1)))

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Read YAML (if given), apply ``key=value`` overrides, and build a validated ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for override in overrides or []:
        apply_override(data, override)
    return build(cls, data, "")


def apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, key: str):
    """Build dataclass ``cls`` from plain data, naming the offending key on any error."""
    where = key or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(f"{name}: unknown key; valid keys here are {sorted(fields)}")
    missing = [
        f.name for f in fields.values()
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{key}.{name}" if key else name)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def _convert(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {sorted(args)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in args:
            if option is type(None) and value is None:
                return None
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_hash(config) -> str:
    text = json.dumps(config_to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
