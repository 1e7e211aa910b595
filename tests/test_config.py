import glob
import importlib
from pathlib import Path

import pytest

from agentflan_ray.cli import JOBS
from agentflan_ray.config import ConfigError, JobConfig, load_config
from agentflan_ray.jobs.chat import ChatConfig
from agentflan_ray.jobs.generate import GenerateConfig
from agentflan_ray.jobs.train import TrainConfig

REPO = Path(__file__).parent.parent
SHIPPED = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
MINIMAL = ['inputs=[{format: sharegpt, path: "x.json"}]']


# Every shipped config and the job that reads it; a new file must be added here.
JOB_OF = {"demo.yaml": "generate", "chat_demo.yaml": "chat", "train_demo.yaml": "train", "negatives_demo.yaml": "negatives",
          "eval_demo.yaml": "eval", "pipeline.yaml": "pipeline", "pipeline_demo.yaml": "pipeline"}


def test_every_shipped_config_is_mapped_to_its_job():
    assert SHIPPED, "jobs/configs/ holds no config"
    assert sorted(p.name for p in SHIPPED) == sorted(JOB_OF), "map each file in jobs/configs/ to its job"
    assert set(JOB_OF.values()) <= set(JOBS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    job = importlib.import_module(JOBS[JOB_OF[path.name]][0])
    config = load_config(job.Config, path)
    if isinstance(config, GenerateConfig):
        assert config.inputs and all(spec.source for spec in config.inputs)
    elif isinstance(config, TrainConfig):
        assert config.data and config.model
    elif hasattr(config, "stages"):  # pipeline: every stage's section builds (validate), and its inputs exist
        data = config.generate["inputs"]
        assert data and all(spec["path"].startswith("s3://") or glob.glob(str(REPO / spec["path"]), recursive=True)
                            for spec in data)
    elif hasattr(config, "sets"):  # eval
        assert all((REPO / path).exists() for path in config.sets)
    elif hasattr(config, "tool_catalogs"):  # negatives
        assert config.inputs and all((REPO / path).exists() for path in config.tool_catalogs)
    else:
        assert (REPO / config.input).exists()


def test_one_typed_group_holds_what_every_job_shares():
    for name, (module, _) in JOBS.items():
        config_class = importlib.import_module(module).Config
        assert issubclass(config_class, JobConfig), name
        assert not {"storage", "ray_address", "progress"} & set(config_class.__annotations__), name


@pytest.mark.parametrize(
    "override, message",
    [
        ("llm.concurrency=0", "llm.concurrency: must be at least 1"),
        ("llm.rpm=-1", "llm.rpm: must be 0 or more"),
        ("llm.api_key=sk-123", "llm.api_key: unknown key"),
        ("llm.prices={gpt-4: 3}", "llm.prices.gpt-4: expected"),
    ],
)
def test_bad_llm_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(ChatConfig, None, ["input=x.jsonl", override])


def test_overrides_reach_nested_keys_and_parse_values():
    config = load_config(
        GenerateConfig, REPO / "jobs/configs/demo.yaml",
        ["seed=3", "output=s3://bucket/run1", "balance.preset=paper", "balance.ratios.retrieval=0.3"],
    )
    assert config.seed == 3
    assert config.output == "s3://bucket/run1"
    assert config.balance.resolved() == {"reasoning": 1.0, "retrieval": 0.3, "understanding": 0.75}


@pytest.mark.parametrize(
    "override, message",
    [
        ("sed=3", "sed: unknown key"),
        ("balance.preset=fast", "balance.preset: must be one of"),
        ("balance.ratios.retrieval=2", "balance.ratios.retrieval: must be a number within [0, 1]"),
        ("seed=three", "seed: expected an integer"),
        ("toolbench_split.react=0.5", "toolbench_split: shares must add up to 1"),
        ("inputs=[{format: csv, path: x}]", "inputs[0].format: must be one of"),
        ("inputs=[{format: sharegpt}]", "inputs[0]: missing key 'path'"),
        ("rewrite=gpt4", "rewrite: must be one of"),
        ("storage.bucket=x", "storage.bucket: unknown key"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(GenerateConfig, None, [*MINIMAL, override])
    assert message in str(info.value)


def test_inputs_are_required():
    with pytest.raises(ConfigError, match="inputs: at least one input"):
        load_config(GenerateConfig, None, [])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(GenerateConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(GenerateConfig, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(GenerateConfig, listing)


TRAIN = ["data=./d", "model=./m"]


@pytest.mark.parametrize("overrides, message", [
    (["num_workers=[4, 2]"], r"num_workers: a number or \[min, max\] with min <= max"),
    (["num_workers=[0, 2]"], "num_workers: must be at least 1"),
    (["num_workers=[2, 4]", "global_batch=8"], r"global_batch: 8 is not a multiple .* for \[3\] workers"),
    (["num_workers=3", "global_batch=8"], r"for \[3\] workers"),
    (["zero_stage=1"], "zero_stage: must be 2 or 3"),
    (["attention=flash"], "attention: must be one of"),
    (["fused_kernels=apex"], "fused_kernels: must be one of"),
    (["optimizer=sgd"], "optimizer: must be one of"),
    (["offload_params=true"], "offload_params: needs zero_stage=3"),
    (["export_dir=./e", "checkpoint_at_end=false"], "checkpoint_at_end: must be true with export_dir"),
])
def test_bad_train_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [*TRAIN, *overrides])


@pytest.mark.parametrize("workers, global_batch, micro, block_rows", [
    ("2", 8, 1, 4),  # fixed size: one block per worker per step
    ("[1, 2]", 8, 1, 4),  # gcd(8, 4)
    ("[2, 4]", 24, 1, 2),  # gcd(12, 8, 6)
    ("[4, 8]", 840, 1, 1),  # gcd(210, 168, 140, 120, 105)
    ("2", 16, 2, 8),
])
def test_blocks_divide_every_workers_share_of_a_step(workers, global_batch, micro, block_rows):
    config = load_config(TrainConfig, None, [*TRAIN, f"num_workers={workers}", f"global_batch={global_batch}",
                                             f"micro_batch={micro}"])
    assert config.block_rows == block_rows
    for n in range(config.min_workers, config.max_workers + 1):
        assert (global_batch // n) % config.block_rows == 0
