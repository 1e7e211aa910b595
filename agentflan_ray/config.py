"""Typed configuration: YAML plus ``key=value`` overrides, validated before any work starts.

Each job owns one dataclass, defined in the job's module and built on ``JobConfig`` (what every job
shares). ``load_config(GenerateConfig, "demo.yaml", ["seed=3"])`` reads the file, applies the
overrides (dotted keys reach nested fields, values are parsed as YAML), and builds the dataclass
field by field. Any unknown key or badly typed value raises ``ConfigError`` naming the key, e.g.
``balance.preset: must be one of ['none', 'paper', 'r10r5u7'], got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agentflan_ray.storage import StorageConfig


class ConfigError(ValueError):
    pass


def require_at_least(obj, key: str, names: tuple[str, ...], minimum: int) -> None:
    """``key.name: must be at least N`` (or ``0 or more``) for the first field below ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            raise ConfigError(f"{key + '.' if key else ''}{name}: must be {bound}, got {value}")


@dataclass
class Placement:
    """Where read, align and LLM-call work runs on a cluster with CPU and GPU nodes.

    With ``cpu_resource`` set (``cpu_node`` in the definitions under ``cluster/``: a custom resource
    only the CPU nodes declare), every such task and actor asks for a sliver of it, so none lands on
    a GPU node; empty (the default, a laptop or a CPU-only cluster): anywhere.
    """

    cpu_resource: str = ""

    def remote_args(self) -> dict:
        return {"resources": {self.cpu_resource: 0.001}} if self.cpu_resource else {}


@dataclass
class JobConfig:
    """What every job shares: where ``s3://`` paths go, which Ray cluster, whether to print progress,
    where data and LLM work may run."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    placement: Placement = field(default_factory=Placement)
    ray_address: str = ""  # empty: $RAY_ADDRESS (as under ray job submit), else a local Ray
    progress: bool = True


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Read YAML (if given), apply ``key=value`` overrides, and build a validated ``cls``."""
    return build(cls, load_data(path, overrides), "")


def load_data(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The plain data of a config: the YAML file (if given) with the ``key=value`` overrides applied."""
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
    return data


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


def config_hash(config, leave_out: tuple[str, ...] = ()) -> str:
    """A digest of the resolved config, less the top-level keys in ``leave_out``."""
    resolved = {k: v for k, v in config_to_dict(config).items() if k not in leave_out}
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
