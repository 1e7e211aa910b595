"""Checks of the cluster definitions under ``cluster/``, each returning problems as
``"file: path.to.field: message"`` (an empty list: the file passes).

    python tests/cluster_schema.py            # every file under cluster/, one problem a line

- KubeRay files against the ``openAPIV3Schema`` of the vendored KubeRay CRDs (tests/fixtures/kuberay/),
  strictly: the CRDs leave out ``additionalProperties: false``, so a misspelt field would pass a plain
  JSON Schema check; here every key must be one the schema names where the schema names any.
- Cluster-launcher files against Ray's own ``ray/autoscaler/ray-schema.json``, then through Ray's
  ``prepare_config`` and ``validate_config`` (defaults merged, head type and worker counts checked), as
  ``ray up`` does.
- No secret inline: an environment variable named like a secret (``*KEY*``, ``*SECRET*``, ``*TOKEN*``,
  ``*PASSWORD*``) only through ``valueFrom.secretKeyRef``, never with a value.
- Versions: the Ray pin of pyproject.toml is the Dockerfile's base image, every KubeRay ``rayVersion``
  and every image tag; the image's Python satisfies ``requires-python``.
- Placement: ``cpu_node`` on the CPU groups and never on a GPU group; GPU pods get a ``/dev/shm`` in memory.
- RayJob entrypoints: ``python jobs/<job>.py --config <file> key=value ...`` names a job script that
  exists and a config that loads with that job's config class, overrides applied (``$VAR`` read as a
  dummy word); a ``placement.cpu_resource`` it sets is declared by the job's cluster.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_DIR = REPO / "tests" / "fixtures" / "kuberay"
CPU_RESOURCE = "cpu_node"
GPU_LIMIT = "nvidia.com/gpu"
SECRET_NAME = re.compile(r"^[A-Z0-9_]*(KEY|SECRET|TOKEN|PASSWORD)[A-Z0-9_]*$")
# NAME=value in a command or an entrypoint, with a literal value (not $VAR, not a sed pattern).
INLINE_SECRET = re.compile(r"\b([A-Z0-9_]*(?:KEY|SECRET|TOKEN|PASSWORD)[A-Z0-9_]*)=[\"']?[A-Za-z0-9]")
# Our image's tag names both versions: ...agentflan-ray:ray2.60.0-py311-gpu
IMAGE_TAG = re.compile(r":ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{3,})\b")
BASE_IMAGE = re.compile(r"^FROM\s+rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{3,})-gpu\b", re.M)


def shown(path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def dotted(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def problem(path: Path, parts, message: str) -> str:
    return f"{shown(path)}: {dotted(parts)}: {message}"


def load_documents(path: Path) -> list:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(Path(path).read_text(), Loader=loader) if doc is not None]


# --- KubeRay ---------------------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str) -> dict:
    """The ``v1`` openAPIV3Schema of the vendored CRD for ``kind``, with ``nullable`` made JSON Schema."""
    (crd,) = load_documents(CRD_DIR / CRD_FILES[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _nullable_to_type(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _nullable_to_type(schema):
    if isinstance(schema, dict):
        if schema.get("nullable") and isinstance(schema.get("type"), str):
            schema["type"] = [schema["type"], "null"]
        for value in schema.values():
            _nullable_to_type(value)
    elif isinstance(schema, list):
        for value in schema:
            _nullable_to_type(value)
    return schema


def unknown_fields(value, schema: dict, parts: list):
    """``(path, message)`` for each key the schema does not name where it names any: what
    ``additionalProperties: false`` would say if the CRDs set it (``x-kubernetes-*`` keys are ignored)."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from unknown_fields(item, properties[key], [*parts, key])
            elif isinstance(extra, dict):
                yield from unknown_fields(item, extra, [*parts, key])
            elif properties is not None and extra is None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                close = difflib.get_close_matches(str(key), properties, n=1)
                yield [*parts, key], "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], [*parts, index])


def kuberay_problems(path: Path) -> list[str]:
    """Every document of a KubeRay file against its CRD, plus the secret and placement rules."""
    problems = []
    for doc in load_documents(path):
        if not isinstance(doc, dict):
            problems.append(problem(path, [], "expected a mapping"))
            continue
        kind = doc.get("kind")
        if kind not in CRD_FILES:
            problems.append(problem(path, ["kind"], f"expected one of {sorted(CRD_FILES)}, got {kind!r}"))
            continue
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(problem(path, ["apiVersion"], f"expected 'ray.io/v1', got {doc.get('apiVersion')!r}"))
        if not (doc.get("metadata") or {}).get("name"):
            problems.append(problem(path, ["metadata", "name"], "required"))
        schema = crd_schema(kind)
        for error in jsonschema.Draft4Validator(schema).iter_errors(doc):
            problems.append(problem(path, list(error.absolute_path), _short(error.message)))
        problems += [problem(path, parts, message) for parts, message in unknown_fields(doc, schema, [])]
        problems += secret_problems(doc, path)
        problems += placement_problems(doc, path)
    return problems


def _short(message: str, limit: int = 240) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


def cluster_specs(doc: dict):
    """``(path, RayCluster spec)`` of a RayCluster or of a RayJob that brings its own cluster."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        yield ["spec"], spec
    elif isinstance(spec.get("rayClusterSpec"), dict):
        yield ["spec", "rayClusterSpec"], spec["rayClusterSpec"]


def groups(spec: dict):
    """``(path, group)`` of the head group and each worker group of a RayCluster spec."""
    if isinstance(spec.get("headGroupSpec"), dict):
        yield ["headGroupSpec"], spec["headGroupSpec"]
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        if isinstance(group, dict):
            yield ["workerGroupSpecs", index], group


def group_resources(group: dict) -> set[str]:
    """Custom Ray resources a group declares, through ``resources`` or ``rayStartParams.resources``."""
    names = set(group.get("resources") or {})
    start = (group.get("rayStartParams") or {}).get("resources")
    if start:
        with contextlib.suppress(ValueError):  # unreadable: declares nothing, and placement says so
            names |= set(json.loads(str(start).strip("'\"").replace('\\"', '"')))
    return names


def group_containers(group: dict) -> list:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def has_gpu(group: dict) -> bool:
    return any(GPU_LIMIT in ((c.get("resources") or {}).get("limits") or {}) for c in group_containers(group))


def placement_problems(doc: dict, path: Path) -> list[str]:
    """GPU groups never carry ``cpu_node`` and mount ``/dev/shm`` in memory with a size limit;
    a cluster with a CPU worker group declares ``cpu_node`` on one."""
    problems = []
    for spec_parts, spec in cluster_specs(doc):
        cpu_workers = []
        for parts, group in groups(spec):
            where = [*spec_parts, *parts]
            if has_gpu(group):
                if CPU_RESOURCE in group_resources(group):
                    problems.append(problem(path, [*where, "resources"],
                                            f"a GPU group must not declare {CPU_RESOURCE} (data and LLM work would land on it)"))
                problems += shm_problems(group, where, path)
            elif parts[0] == "workerGroupSpecs":
                cpu_workers.append(group)
        if cpu_workers and not any(CPU_RESOURCE in group_resources(g) for g in cpu_workers):
            problems.append(problem(path, [*spec_parts, "workerGroupSpecs"],
                                    f"no CPU worker group declares {CPU_RESOURCE} (jobs asking for it would wait forever)"))
    return problems


def shm_problems(group: dict, where: list, path: Path) -> list[str]:
    pod = (group.get("template") or {}).get("spec") or {}
    memory_volumes = {v.get("name") for v in pod.get("volumes") or []
                      if (v.get("emptyDir") or {}).get("medium") == "Memory" and (v.get("emptyDir") or {}).get("sizeLimit")}
    for container in group_containers(group):
        mounts = {m.get("name") for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"}
        if not mounts & memory_volumes:
            return [problem(path, [*where, "template", "spec", "volumes"],
                            "a GPU group needs /dev/shm from an emptyDir with medium: Memory and a sizeLimit (NCCL)")]
    return []


# --- RayJob entrypoints ---------------------------------------------------------------------------


def entrypoint_problems(path: Path) -> list[str]:
    """The entrypoint of every RayJob in a file: its job script, config and overrides, and placement."""
    problems = []
    for doc in load_documents(path):
        if not isinstance(doc, dict) or doc.get("kind") != "RayJob":
            continue
        entrypoint = (doc.get("spec") or {}).get("entrypoint")
        if not isinstance(entrypoint, str):
            problems.append(problem(path, ["spec", "entrypoint"], "required"))
            continue
        declared = None  # a clusterSelector: the resources of a cluster defined elsewhere
        for _, spec in cluster_specs(doc):
            declared = set().union(*(group_resources(g) for _, g in groups(spec)))
        problems += [problem(path, ["spec", "entrypoint"], message) for message in check_entrypoint(entrypoint, declared)]
    return problems


def check_entrypoint(entrypoint: str, declared: set[str] | None) -> list[str]:
    """Problems of one ``python jobs/<job>.py --config <file> key=value ...`` command line."""
    from agentflan_ray.cli import JOBS
    from agentflan_ray.config import ConfigError, load_config

    tokens = shlex.split(entrypoint)
    if len(tokens) < 2 or tokens[0] not in ("python", "python3") or not re.fullmatch(r"jobs/\w+\.py", tokens[1]):
        return [f"expected 'python jobs/<job>.py --config <file> key=value ...', got {entrypoint!r}"]
    script, name = REPO / tokens[1], Path(tokens[1]).stem
    if not script.exists():
        return [f"{tokens[1]}: no such job script"]
    if name not in JOBS:
        return [f"{tokens[1]}: {name!r} is not a job of agentflan_ray.cli.JOBS ({', '.join(JOBS)})"]
    rest = tokens[2:]
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        return ["--config <file>: missing"]
    config_file = rest[rest.index("--config") + 1]
    if not (REPO / config_file).exists():
        return [f"--config {config_file}: no such file"]
    overrides = [re.sub(r"\$\{?\w+\}?", "dummy", token) for token in rest if "=" in token and not token.startswith("-")]
    try:
        config = load_config(importlib.import_module(JOBS[name][0]).Config, REPO / config_file, overrides)
    except ConfigError as exc:
        return [f"{config_file} with {' '.join(overrides) or 'no overrides'}: {exc}"]
    resource = getattr(getattr(config, "placement", None), "cpu_resource", "")
    if resource and declared is not None and resource not in declared:
        return [f"placement.cpu_resource={resource}: no group of this cluster declares it (the job would wait forever)"]
    return []


# --- secrets ---------------------------------------------------------------------------------------


def secret_problems(doc, path: Path, parts: list | None = None) -> list[str]:
    """Secret-named variables: an env entry only through ``valueFrom.secretKeyRef``; no literal value as
    a mapping entry (``OPENAI_API_KEY: sk-...``) or in a string (``-e OPENAI_API_KEY=sk-...``); also
    inside a RayJob's ``runtimeEnvYAML``."""
    parts = parts or []
    problems = []
    if isinstance(doc, dict):
        name = doc.get("name")
        if isinstance(name, str) and SECRET_NAME.match(name) and ("value" in doc or "valueFrom" in doc):
            if "value" in doc:
                problems.append(problem(path, [*parts, "value"], f"{name}: a secret given inline; use valueFrom.secretKeyRef"))
            elif not (doc.get("valueFrom") or {}).get("secretKeyRef"):
                problems.append(problem(path, [*parts, "valueFrom"], f"{name}: must come from valueFrom.secretKeyRef"))
        for key, value in doc.items():
            if isinstance(key, str) and SECRET_NAME.match(key) and isinstance(value, str | int | float) \
                    and not isinstance(value, bool) and str(value).strip() and not str(value).startswith("$"):
                problems.append(problem(path, [*parts, key], f"{key}: a secret given inline"))
            elif key == "runtimeEnvYAML" and isinstance(value, str):
                try:
                    problems += secret_problems(yaml.safe_load(value), path, [*parts, key])
                except yaml.YAMLError as exc:
                    problems.append(problem(path, [*parts, key], f"not valid YAML: {exc}"))
            else:
                problems += secret_problems(value, path, [*parts, key])
    elif isinstance(doc, list):
        for index, item in enumerate(doc):
            problems += secret_problems(item, path, [*parts, index])
    elif isinstance(doc, str):
        for match in INLINE_SECRET.finditer(doc):
            problems.append(problem(path, parts, f"{match.group(1)}: a secret given inline"))
    return problems


def dockerfile_problems(path: Path) -> list[str]:
    """A secret-named ENV or ARG would be baked into the image (ARG values show in its history)."""
    problems = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        match = re.match(r"\s*(ENV|ARG)\s+([A-Za-z0-9_]+)", line)
        if match and SECRET_NAME.match(match.group(2)):
            problems.append(f"{shown(path)}: line {number}: {match.group(2)}: a secret in the image")
    return problems


# --- cluster launcher ------------------------------------------------------------------------------


@functools.cache
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def launcher_problems(path: Path) -> list[str]:
    """A cluster-launcher file against Ray's schema, then Ray's own preparation and checks of ``ray up``."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = load_documents(path)
    errors = list(jsonschema.Draft7Validator(ray_schema()).iter_errors(config))
    problems = [problem(path, list(e.absolute_path), _short(e.message)) for e in errors]
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except (ValueError, RuntimeError, AssertionError, jsonschema.ValidationError) as exc:
            problems.append(problem(path, [], f"ray up would refuse it: {exc}"))
    problems += secret_problems(config, path)
    problems += launcher_placement_problems(config, path)
    return problems


def launcher_placement_problems(config: dict, path: Path) -> list[str]:
    problems, cpu_types = [], []
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        resources = node_type.get("resources") or {}
        instance = str((node_type.get("node_config") or {}).get("InstanceType", ""))
        gpu = resources.get("GPU", 0) > 0 or re.match(r"^(p|g)\d", instance)  # AWS GPU families
        if gpu and CPU_RESOURCE in resources:
            problems.append(problem(path, ["available_node_types", name, "resources", CPU_RESOURCE],
                                    "a GPU node type must not declare it (data and LLM work would land on it)"))
        elif not gpu and name != head:
            cpu_types.append(resources)
    if cpu_types and not any(CPU_RESOURCE in r for r in cpu_types):
        problems.append(problem(path, ["available_node_types"], f"no CPU worker type declares {CPU_RESOURCE}"))
    return problems


# --- versions --------------------------------------------------------------------------------------


def ray_pin(pyproject: Path) -> str | None:
    match = re.search(r'"ray\[[^\]]*\]==([0-9][0-9.]*)"', Path(pyproject).read_text())
    return match.group(1) if match else None


def images(doc) -> list[tuple[list, str]]:
    """``(path, image)`` of every ``image`` (containers) and docker ``*image`` key in a document."""
    found = []

    def walk(value, parts):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("image", "head_image", "worker_image") and isinstance(item, str):
                    found.append(([*parts, key], item))
                else:
                    walk(item, [*parts, key])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, [*parts, index])

    walk(doc, [])
    return found


def version_problems(pyproject: Path, dockerfile: Path, kuberay_files, launcher_files) -> list[str]:
    """The Ray pin everywhere: Dockerfile base image, KubeRay ``rayVersion``, image tags; the image's
    Python the same everywhere and allowed by ``requires-python``."""
    from packaging.specifiers import SpecifierSet

    pin = ray_pin(pyproject)
    if pin is None:
        return [f"{shown(pyproject)}: dependencies: the ray dependency must be pinned exactly (ray[...]==X.Y.Z)"]
    problems = []
    base = BASE_IMAGE.search(Path(dockerfile).read_text())
    if base is None:
        return [f"{shown(dockerfile)}: FROM: expected rayproject/ray:<ray version>-py<python>-gpu"]
    python = base.group("py")
    if base.group("ray") != pin:
        problems.append(f"{shown(dockerfile)}: FROM: Ray {base.group('ray')}, but pyproject.toml pins {pin}")
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', Path(pyproject).read_text())
    version = f"{python[0]}.{python[1:]}"
    if requires and version not in SpecifierSet(requires.group(1)):
        problems.append(f"{shown(dockerfile)}: FROM: Python {version} is outside requires-python {requires.group(1)}")
    for path in kuberay_files:
        for doc in load_documents(path):
            for parts, spec in cluster_specs(doc):
                if str(spec.get("rayVersion")) != pin:
                    problems.append(problem(path, [*parts, "rayVersion"], f"{spec.get('rayVersion')!r}, but pyproject.toml pins {pin}"))
    for path in [*kuberay_files, *launcher_files]:
        for doc in load_documents(path):
            for parts, image in images(doc):
                tag = IMAGE_TAG.search(image)
                if tag is None:
                    problems.append(problem(path, parts, f"{image}: the tag must name the versions (:ray{pin}-py{python}-gpu)"))
                elif (tag.group("ray"), tag.group("py")) != (pin, python):
                    problems.append(problem(path, parts, f"{image}: expected Ray {pin} and py{python} as in the Dockerfile and pyproject.toml"))
    return problems


# --- all -------------------------------------------------------------------------------------------


def kuberay_files(root: Path = CLUSTER) -> list[Path]:
    return sorted((root / "kuberay").glob("*.yaml"))


def launcher_files(root: Path = CLUSTER) -> list[Path]:
    return sorted(root.glob("*.yaml"))


def all_problems(root: Path = CLUSTER, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    problems = []
    for path in kuberay_files(root):
        problems += kuberay_problems(path) + entrypoint_problems(path)
    for path in launcher_files(root):
        problems += launcher_problems(path)
    problems += dockerfile_problems(root / "Dockerfile")
    problems += version_problems(pyproject, root / "Dockerfile", kuberay_files(root), launcher_files(root))
    return problems


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # the package as checked out, as pytest sees it
    found = all_problems()
    print("\n".join(found) or f"{shown(CLUSTER)}: no problems")
    sys.exit(1 if found else 0)
