"""The cluster definitions under cluster/ pass the checks of tests/cluster_schema.py (KubeRay CRDs,
Ray's launcher schema, entrypoints, secrets, versions, placement), and broken copies fail them with a
message naming the file and the field."""

from __future__ import annotations

import shutil

import pytest
import yaml
from cluster_schema import (
    CLUSTER,
    REPO,
    check_entrypoint,
    dockerfile_problems,
    entrypoint_problems,
    kuberay_files,
    kuberay_problems,
    launcher_files,
    launcher_problems,
    load_documents,
    ray_pin,
    version_problems,
)

KUBERAY = {"raycluster.yaml", "rayjob-generate.yaml", "rayjob-train.yaml", "rayjob-pipeline.yaml"}
LAUNCHER = {"aws.yaml"}


def ids(paths):
    return [path.name for path in paths]


def broken_copy(tmp_path, source, edit):
    """``source`` written to ``tmp_path`` under its own name after ``edit(document)``."""
    (doc,) = load_documents(source)
    edit(doc)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def names(problems, text):
    return any(text in problem for problem in problems)


# --- the shipped files -----------------------------------------------------------------------------


def test_every_file_under_cluster_is_checked():
    assert {p.name for p in kuberay_files()} == KUBERAY
    assert {p.name for p in launcher_files()} == LAUNCHER
    checked = {*kuberay_files(), *launcher_files(), CLUSTER / "Dockerfile", CLUSTER / "README.md"}
    unchecked = [p for p in CLUSTER.rglob("*") if p.is_file() and p not in checked]
    assert unchecked == [], "add a check to tests/cluster_schema.py for these"


@pytest.mark.parametrize("path", kuberay_files(), ids=ids(kuberay_files()))
def test_kuberay_file_matches_its_crd(path):
    assert kuberay_problems(path) == []


@pytest.mark.parametrize("path", launcher_files(), ids=ids(launcher_files()))
def test_launcher_file_passes_rays_own_checks(path):
    assert launcher_problems(path) == []


RAYJOBS = [p for p in kuberay_files() if p.name.startswith("rayjob-")]


@pytest.mark.parametrize("path", RAYJOBS, ids=ids(RAYJOBS))
def test_rayjob_entrypoint_runs_a_job_whose_config_loads(path):
    assert entrypoint_problems(path) == []


def test_versions_agree_with_the_pin_and_the_installed_ray():
    import ray

    assert ray_pin(REPO / "pyproject.toml") == ray.__version__
    assert version_problems(REPO / "pyproject.toml", CLUSTER / "Dockerfile", kuberay_files(), launcher_files()) == []


def test_the_image_holds_no_secret():
    assert dockerfile_problems(CLUSTER / "Dockerfile") == []


# --- broken copies fail, naming file and field -----------------------------------------------------


def test_a_misspelt_field_fails_naming_file_and_field(tmp_path):
    def edit(doc):
        cpu = doc["spec"]["workerGroupSpecs"][0]
        cpu["rayStartParms"] = {"num-cpus": "1"}
        cpu["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"

    problems = kuberay_problems(broken_copy(tmp_path, CLUSTER / "kuberay" / "raycluster.yaml", edit))
    assert names(problems, "raycluster.yaml: spec.workerGroupSpecs[0].rayStartParms: unknown field")
    assert names(problems, "raycluster.yaml: spec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolcy: "
                           "unknown field (did you mean 'imagePullPolicy'?)")


def test_a_wrongly_typed_or_missing_field_fails(tmp_path):
    def edit(doc):
        doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
        del doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]

    problems = kuberay_problems(broken_copy(tmp_path, CLUSTER / "kuberay" / "rayjob-generate.yaml", edit))
    assert names(problems, "rayjob-generate.yaml: spec.rayClusterSpec.workerGroupSpecs[0].minReplicas: 'one' is not of type")
    assert names(problems, "rayjob-generate.yaml: spec.rayClusterSpec.workerGroupSpecs[0]: 'groupName' is a required")


def test_an_inline_secret_fails_naming_file_and_field(tmp_path):
    source = CLUSTER / "kuberay" / "rayjob-pipeline.yaml"

    def head_env(doc):
        return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]

    (original,) = load_documents(source)
    index = next(i for i, e in enumerate(head_env(original)) if e["name"] == "OPENAI_API_KEY")

    def edit(doc):
        head_env(doc)[index] = {"name": "OPENAI_API_KEY", "value": "sk-live-123"}
        head_env(doc).append({"name": "HF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "hf", "key": "token"}}})
        doc["spec"]["runtimeEnvYAML"] = "env_vars:\n  AWS_SECRET_ACCESS_KEY: abc123\n"
        doc["spec"]["entrypoint"] = "OPENAI_API_KEY=sk-live-123 " + doc["spec"]["entrypoint"]

    problems = kuberay_problems(broken_copy(tmp_path, source, edit))
    env = "rayjob-pipeline.yaml: spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env"
    assert names(problems, f"{env}[{index}].value: OPENAI_API_KEY: a secret given inline; use valueFrom.secretKeyRef")
    assert names(problems, f"{env}[{len(head_env(original))}].valueFrom: HF_TOKEN: must come from valueFrom.secretKeyRef")
    assert names(problems, "rayjob-pipeline.yaml: spec.runtimeEnvYAML.env_vars.AWS_SECRET_ACCESS_KEY: ")
    assert names(problems, "rayjob-pipeline.yaml: spec.entrypoint: OPENAI_API_KEY: a secret given inline")


def test_a_launcher_file_with_a_wrong_field_or_an_inline_secret_fails(tmp_path):
    def edit(config):
        config["available_node_types"]["cpu"]["min_worker"] = 1
        config["docker"]["run_options"].append("--env OPENAI_API_KEY=sk-live-123")
        config["setup_commands"] = ["echo 'export AWS_SECRET_ACCESS_KEY=\"wJalrXUt\"' >> ~/.bashrc"]

    problems = launcher_problems(broken_copy(tmp_path, CLUSTER / "aws.yaml", edit))
    assert names(problems, "aws.yaml: available_node_types.cpu: Additional properties are not allowed ('min_worker'")
    assert names(problems, "aws.yaml: docker.run_options[") and names(problems, "]: OPENAI_API_KEY: a secret given inline")
    assert names(problems, "aws.yaml: setup_commands[0]: AWS_SECRET_ACCESS_KEY: a secret given inline")


def test_a_launcher_file_ray_up_would_refuse_fails(tmp_path):
    def edit(config):
        config["available_node_types"]["cpu"]["min_workers"] = config["max_workers"] + 1

    problems = launcher_problems(broken_copy(tmp_path, CLUSTER / "aws.yaml", edit))
    assert names(problems, "aws.yaml: (top level): ray up would refuse it: The specified global `max_workers`")


def test_work_for_cpu_nodes_must_not_land_on_gpu_nodes(tmp_path):
    def edit(doc):
        cpu, gpu = doc["spec"]["workerGroupSpecs"]
        gpu["resources"] = {"cpu_node": "1000"}
        del gpu["template"]["spec"]["volumes"]

    problems = kuberay_problems(broken_copy(tmp_path, CLUSTER / "kuberay" / "raycluster.yaml", edit))
    assert names(problems, "raycluster.yaml: spec.workerGroupSpecs[1].resources: a GPU group must not declare cpu_node")
    assert names(problems, "raycluster.yaml: spec.workerGroupSpecs[1].template.spec.volumes: a GPU group needs /dev/shm")

    def edit_launcher(config):
        config["available_node_types"]["gpu"]["resources"] = {"cpu_node": 1000}
        config["available_node_types"]["cpu"]["resources"] = {}

    problems = launcher_problems(broken_copy(tmp_path, CLUSTER / "aws.yaml", edit_launcher))
    assert names(problems, "aws.yaml: available_node_types.gpu.resources.cpu_node: a GPU node type must not declare it")
    assert names(problems, "aws.yaml: available_node_types: no CPU worker type declares cpu_node")


def test_versions_that_disagree_fail(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((REPO / "pyproject.toml").read_text().replace('requires-python = ">=3.10"',
                                                                       'requires-python = ">=3.12"'))
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text((CLUSTER / "Dockerfile").read_text().replace("rayproject/ray:2.60.0-", "rayproject/ray:2.59.0-"))
    (tmp_path / "k").mkdir()
    cluster = broken_copy(tmp_path / "k", CLUSTER / "kuberay" / "raycluster.yaml",
                          lambda doc: doc["spec"].update(rayVersion="2.59.0"))
    launcher = broken_copy(tmp_path, CLUSTER / "aws.yaml",
                           lambda config: config["docker"].update(image="rayproject/ray:latest-gpu"))
    problems = version_problems(pyproject, dockerfile, [cluster], [launcher])
    pin = ray_pin(REPO / "pyproject.toml")
    assert names(problems, f"Dockerfile: FROM: Ray 2.59.0, but pyproject.toml pins {pin}")
    assert names(problems, "Dockerfile: FROM: Python 3.11 is outside requires-python >=3.12")
    assert names(problems, f"raycluster.yaml: spec.rayVersion: '2.59.0', but pyproject.toml pins {pin}")
    assert names(problems, "aws.yaml: docker.image: rayproject/ray:latest-gpu: the tag must name the versions")


def test_an_unpinned_ray_fails(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((REPO / "pyproject.toml").read_text().replace("ray[default,data,train]==", "ray[default,data,train]>="))
    problems = version_problems(pyproject, CLUSTER / "Dockerfile", [], [])
    assert names(problems, "pyproject.toml: dependencies: the ray dependency must be pinned exactly")


def test_a_secret_baked_into_the_image_fails(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    shutil.copy(CLUSTER / "Dockerfile", dockerfile)
    dockerfile.write_text(dockerfile.read_text() + "ARG HF_TOKEN\nENV OPENAI_API_KEY=sk-live-123\n")
    problems = dockerfile_problems(dockerfile)
    assert names(problems, "Dockerfile: line ") and names(problems, ": HF_TOKEN: a secret in the image")
    assert names(problems, ": OPENAI_API_KEY: a secret in the image")


@pytest.mark.parametrize(("entrypoint", "message"), [
    ("python jobs/nosuch.py --config jobs/configs/demo.yaml", "jobs/nosuch.py: no such job script"),
    ("python jobs/generate.py --config jobs/configs/nosuch.yaml", "--config jobs/configs/nosuch.yaml: no such file"),
    ("python jobs/generate.py --config jobs/configs/demo.yaml outptu=s3://b/run1", "outptu: unknown key"),
    ("python jobs/train.py --config jobs/configs/train_demo.yaml num_workers=[2,4]", "global_batch: 4 is not a multiple"),
    ("python jobs/generate.py --config jobs/configs/demo.yaml placement.cpu_resource=cpu_nodes",
     "placement.cpu_resource=cpu_nodes: no group of this cluster declares it"),
    ("bash -c 'python jobs/generate.py'", "expected 'python jobs/<job>.py --config <file> key=value ...'"),
])
def test_an_entrypoint_that_cannot_run_fails(entrypoint, message):
    assert names(check_entrypoint(entrypoint, declared={"cpu_node"}), message)


def test_shell_variables_in_overrides_are_read_as_a_word():
    assert check_entrypoint("python jobs/generate.py --config jobs/configs/demo.yaml output=s3://b/$RUN seed=3",
                            declared=None) == []
