"""The generate job end to end on a real local Ray: accounting, idempotence, bad input, S3."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from conftest import REPO, demo_overrides

from agentflan_ray.aligning.split import held_out
from agentflan_ray.cli import main
from agentflan_ray.config import ConfigError, load_config
from agentflan_ray.evaluating.build import read_toolbench
from agentflan_ray.jobs.generate import GenerateConfig, drop_held_out_material, succeeded
from agentflan_ray.jobs.generate import run as generate
from agentflan_ray.storage import StorageConfig

STREAM_DIRS = {"tflan_cot", "tflan_decomposed", "instruct", "agent_instruct_react", "agent_instruct_tflan",
               "general", "agentflan", "quarantine"}


def run(overrides):
    config = load_config(GenerateConfig, None, overrides)
    return generate(config, log=lambda *_: None)


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.parquet"))}


def test_demo_data_every_record_accounted_for(ray_session, sample_data, tmp_path):
    out = tmp_path / "out"
    manifest = run(demo_overrides(sample_data, out))
    counts = manifest["counts"]
    none_lost = {"dead_lettered": 0}
    assert counts["per_source"]["toolbench"] == {"read": 10, "written": 6, "quarantined": 4, **none_lost}
    assert counts["per_source"]["agentinstruct"] == {"read": 30, "written": 30, "quarantined": 0, **none_lost}
    assert counts["per_source"]["sharegpt"] == {"read": 6, "written": 6, "quarantined": 0, **none_lost}
    assert counts["per_source"]["agentflan"] == {"read": 5, "written": 5, "quarantined": 0, **none_lost}
    assert manifest["job"] == "generate"
    assert counts["per_reason"] == {"toolbench_give_up": 3, "toolbench_invalid_data": 1}

    on_disk = {p.parent.name for p in out.rglob("part-*.parquet")}
    assert on_disk == STREAM_DIRS
    quarantine = pq.read_table(out / "quarantine").to_pylist()
    assert sorted(r["reason"] for r in quarantine) == ["toolbench_give_up"] * 3 + ["toolbench_invalid_data"]
    samples = pq.read_table(out / "tflan_decomposed").to_pylist()
    assert set(samples[0]) == {"id", "source", "source_id", "stream", "messages", "tools", "meta"}
    assert samples[0]["meta"] is None  # template mode
    assert manifest["samples"]["total"] == sum(f["rows"] for f in manifest["files"] if not f["path"].startswith("quarantine"))
    tokens = manifest["trained_tokens"]
    assert tokens["after_balancing"]["retrieval"] < tokens["before_balancing"]["retrieval"]
    assert tokens["after_balancing"]["reasoning"] == tokens["before_balancing"]["reasoning"]
    assert manifest["config_hash"] and manifest["versions"]["ray"]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_rerun_replaces_files_and_removes_stale_ones(ray_session, sample_data, tmp_path):
    out = tmp_path / "out"
    overrides = [*demo_overrides(sample_data, out), "task_bytes=60000"]
    first = run(overrides)
    assert len({f["path"].split("/")[1] for f in first["files"]}) > 1, "expected several read tasks"
    digests = file_digests(out)
    stale = out / "tflan_cot" / "part-09999.parquet"
    stale.write_bytes(b"left over from an earlier, larger input")
    second = run(overrides)
    assert not stale.exists()
    assert file_digests(out) == digests
    assert second == first


def test_eval_holdout_keeps_the_eval_suites_trajectories_out_of_training(ray_session, sample_data, tmp_path):
    out = tmp_path / "out"
    manifest = run([*demo_overrides(sample_data, out), "seed=3", "eval_holdout=0.5"])
    toolbench = f"{sample_data}/toolbench/**/*.json"
    usable = {t.id for t in read_toolbench([toolbench], StorageConfig(), Counter())}
    held = {i for i in usable if held_out(3, i, 0.5)}
    assert len(usable) == 6 and 0 < len(held) < 6
    counts = manifest["counts"]
    assert counts["per_source"]["toolbench"] == {"read": 10, "written": 6 - len(held), "quarantined": 4,
                                                 "dead_lettered": 0, "held_out": len(held)}
    assert counts["per_source"]["agentinstruct"]["held_out"] == 0 and counts["held_out"] == len(held)
    assert succeeded(manifest)
    assert manifest["eval_holdout"] == {"seed": 3, "share": 0.5, "toolbench_inputs": [toolbench],
                                        "held_out_for_eval": {"toolbench": len(held)}, "negative_material_left_out": 0}
    trained = {row["source_id"] for shard in out.rglob("part-*.parquet") if shard.parent.name != "quarantine"
               for row in pq.read_table(shard, columns=["source", "source_id"]).to_pylist() if row["source"] == "toolbench"}
    assert trained == usable - held
    # The eval suites, built from this run's manifest, are exactly the held-out trajectories.
    sets = tmp_path / "sets.jsonl"
    assert main(["eval-sets", "--generate-manifest", str(out), "--output", str(sets)]) == 0
    assert {json.loads(line)["source_id"] for line in sets.read_text().splitlines()} == held


def test_eval_holdout_leaves_out_negative_material_and_is_checked():
    material = {"tool_query": [{"source": "toolbench", "id": f"G1/{i}.json#0"} for i in range(200)]
                + [{"source": "agentinstruct", "id": f"os/{i}"} for i in range(50)],
                "tool_list": [{"source": "teval", "id": "weather"}]}
    config = load_config(GenerateConfig, None, ["inputs=[{format: toolbench, path: x}]", "seed=2", "eval_holdout=0.3"])
    dropped = drop_held_out_material(material, config.seed, config.eval_holdout)
    assert 30 < dropped < 100 and len(material["tool_query"]) == 250 - dropped
    assert not any(held_out(2, m["id"], 0.3) for m in material["tool_query"] if m["source"] == "toolbench")
    assert len(material["tool_list"]) == 1 and sum(m["source"] == "agentinstruct" for m in material["tool_query"]) == 50
    for share in ("1", "-0.1"):
        with pytest.raises(ConfigError, match="eval_holdout: must be within"):
            load_config(GenerateConfig, None, ["inputs=[{format: toolbench, path: x}]", f"eval_holdout={share}"])


def write_broken_corpus(root: Path) -> None:
    root.mkdir()
    (root / "truncated.json").write_text('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "val')
    (root / "wrong_types.json").write_text(json.dumps([
        {"conversations": "not a list"},
        {"conversations": [{"from": "human", "value": 42}]},
        {"conversations": [{"from": 1, "value": "x"}]},
        17,
        {"conversations": [{"from": "human", "value": "fine"}, {"from": "gpt", "value": "ok"}]},
    ]))
    (root / "empty_lists.json").write_text(json.dumps([{"conversations": []}, []]))
    (root / "empty_file.json").write_text("")
    (root / "garbage.json").write_bytes(bytes(range(256)) * 64)
    (root / "lines.jsonl").write_bytes(b'{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
                                       b"{oops\n\xff\xfe\xfa\n")
    # One 50 MB record: over the default max_record_bytes (16 MiB), so quarantined, not loaded twice.
    with open(root / "huge.json", "w") as f:
        f.write('{"conversations": [{"from": "human", "value": "')
        f.write("x" * (50 << 20))
        f.write('"}, {"from": "gpt", "value": "ok"}]}')


@pytest.mark.slow
def test_broken_corpus_is_quarantined_never_a_crash(ray_session, tmp_path):
    write_broken_corpus(tmp_path / "broken")
    out = tmp_path / "out"
    manifest = run([f'inputs=[{{format: sharegpt, path: "{tmp_path}/broken/*"}}]', f"output={out}", "progress=false"])
    counts = manifest["counts"]
    assert counts["read"] == counts["written"] + counts["quarantined"]
    assert counts["written"] == 2
    reasons = counts["per_reason"]
    assert reasons["invalid_json"] >= 2 and reasons["not_utf8"] >= 1 and reasons["record_too_large"] == 1
    assert reasons["wrong_type"] == 4 and reasons["empty_trajectory"] == 1 and reasons["unknown_role"] == 1
    rows = pq.read_table(out / "quarantine").to_pylist()
    assert len(rows) == counts["quarantined"]
    assert all(r["reason"] and r["path"] for r in rows)
    assert max(len(r["record"]) for r in rows) <= 2000


def test_reads_from_and_writes_to_s3(ray_session, s3_server, s3_bucket, sample_data):
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in sample_data.rglob("*.json"):
        s3.upload_file(str(path), s3_bucket, f"in/{path.relative_to(sample_data)}")
    manifest = run([*demo_overrides(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/run1")])
    assert manifest["counts"]["per_source"]["toolbench"] == {"read": 10, "written": 6, "quarantined": 4,
                                                             "dead_lettered": 0}
    assert manifest["counts"]["read"] == 51
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="run1/")["Contents"]}
    assert "run1/manifest.json" in keys
    assert "run1/tflan_decomposed/part-00000.parquet" in keys
    stored = json.loads(s3.get_object(Bucket=s3_bucket, Key="run1/manifest.json")["Body"].read())
    assert stored["counts"] == manifest["counts"]
    for key in keys:
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert b"testing-secret-key-do-not-log" not in body and b"testing-access-key" not in body


def test_cli_runs_in_process_on_the_shared_cluster(ray_session, sample_data, tmp_path):
    assert main(["generate", "--config", str(REPO / "jobs/configs/demo.yaml"), *demo_overrides(sample_data, tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["seed=x"], "seed: expected an integer"),
        (["rewrite=llm", "llm.api_key_env=AGENTFLAN_TEST_UNSET_KEY"], "$AGENTFLAN_TEST_UNSET_KEY is not set"),
        (["inputs=[{format: sharegpt, path: /nonexistent/dir/x.json}]"], "input not found: /nonexistent/dir/x.json"),
    ],
)
def test_cli_bad_input_is_a_clear_message_not_a_traceback(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "agentflan_ray.cli", "generate", "--config", str(REPO / "jobs/configs/demo.yaml"),
         f"output={tmp_path}/o", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
