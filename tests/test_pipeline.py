"""The pipeline job: stages in order under one output, finished stages skipped on a rerun, a changed
setting rerunning only the stages it touches. The two-node run with S3 and a killed driver is in
test_cluster.py."""

import json

import pytest
from conftest import REPO, demo_overrides

from agentflan_ray.config import ConfigError, load_config
from agentflan_ray.jobs.pipeline import PipelineConfig

DEMO = REPO / "jobs/configs/pipeline_demo.yaml"


def test_a_bad_stage_setting_fails_before_anything_runs_naming_the_stage():
    with pytest.raises(ConfigError, match=r"^train: global_batch: 3 is not a multiple"):
        load_config(PipelineConfig, DEMO, ["train.global_batch=3", "train.num_workers=2"])
    with pytest.raises(ConfigError, match=r"^generate\.rewrite: must be one of"):
        load_config(PipelineConfig, DEMO, ["generate.rewrite=fast"])
    with pytest.raises(ConfigError, match=r"^negatives\.nope: unknown key"):
        load_config(PipelineConfig, DEMO, ["negatives.nope=1"])
    with pytest.raises(ConfigError, match="tiny_model: must be a local directory"):
        load_config(PipelineConfig, DEMO, ["tiny_model=s3://bucket/tiny"])


def stage_overrides(sample_data, tmp_path) -> list[str]:
    generate = [o for o in demo_overrides(sample_data, "unused") if o.startswith(("inputs=", "instruct_share="))]
    return [f"output={tmp_path / 'run'}", f"tiny_model={tmp_path / 'tiny'}", "stages=[generate, train]",
            "simulator=false", "progress=false", "generate.rewrite=template", "train.shares={}",
            "train.max_steps=2", "train.checkpoint_every=1", "train.max_seq_len=512",
            *(f"generate.{o}" for o in generate)]


@pytest.mark.slow
def test_a_rerun_skips_finished_stages_and_a_changed_setting_reruns_only_what_it_touches(
        ray_session, sample_data, tmp_path):
    from agentflan_ray.cli import run_job

    logs = []
    overrides = stage_overrides(sample_data, tmp_path)
    _, first = run_job("pipeline", str(DEMO), overrides, log=logs.append)
    assert first["stages"] == {"generate": "ran", "train": "ran"}
    run = tmp_path / "run"
    generated = json.loads((run / "generate/manifest.json").read_text())
    trained = json.loads((run / "train/manifest.json").read_text())
    assert generated["counts"]["read"] == 51 and trained["counts"]["read"] == trained["data"]["samples"] > 0
    assert trained["metrics"]["step"] == 2 and (run / "train/model/config.json").is_file()
    summary = first["summary"]
    assert summary["generate_samples"] == {k: v for k, v in generated["samples"]["per_stream"].items() if v}
    assert summary["trained_tokens"] == sum(trained["data"]["trained_tokens"].values()) > 0
    assert json.loads((run / "manifest.json").read_text())["job"] == "pipeline"

    _, again = run_job("pipeline", str(DEMO), overrides, log=logs.append)
    assert again["stages"] == {"generate": "skipped", "train": "skipped"}
    assert json.loads((run / "generate/manifest.json").read_text()) == generated

    _, changed = run_job("pipeline", str(DEMO), [*overrides, "train.lr=0.002"], log=logs.append)
    assert changed["stages"] == {"generate": "skipped", "train": "ran"}
    retrained = json.loads((run / "train/manifest.json").read_text())
    # A new run name: trained anew, not resumed from the checkpoints of the other learning rate.
    assert retrained["config"]["run_name"] != trained["config"]["run_name"]
    assert retrained["metrics"]["resumed_from"] in (0, None)

    (run / "generate/manifest.json").write_text(json.dumps({**generated, "tampered": True}))
    _, redone = run_job("pipeline", str(DEMO), [*overrides, "stages=[generate]"], log=logs.append)
    assert redone["stages"] == {"generate": "ran"}  # a manifest not as recorded is not trusted


def test_estimate_adds_up_the_llm_stages_without_calling_anything():
    from agentflan_ray.cli import run_job

    logs = []
    _, result = run_job("pipeline", str(DEMO), ["simulator=false", "llm.base_url=http://127.0.0.1:9/v1",
                                                "llm.model=gpt-4"], log=logs.append, estimate=True)
    assert set(result) == {"generate", "negatives", "cost_usd"}
    parts = result["generate"]["projected"]["cost_usd"] + result["negatives"]["cost_usd"]
    assert result["cost_usd"] == round(parts, 2) > 0
    assert any("eval: a model directory, no API call" in line for line in logs)
