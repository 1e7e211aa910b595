"""Jobs talk through manifests: a consumer refuses an unfinished output and reads exactly the files
listed; jobs whose roots share a prefix (siblings, or nested) never touch each other's files; a
config with a missing input fails in seconds on the driver, before Ray starts."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, demo_overrides, write_tiny_data

from agentflan_ray.config import load_config
from agentflan_ray.jobs.train import TrainConfig
from agentflan_ray.records import SAMPLE_SCHEMA
from agentflan_ray.storage import StorageConfig
from agentflan_ray.writing.manifest import IncompleteOutput, read_manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("shape"))


def train_config(root: Path, data: Path) -> TrainConfig:
    return load_config(TrainConfig, None, [f"data={data}", f"model={root / 'model'}", "max_seq_len=128",
                                           "global_batch=4", "num_workers=1", f"storage_path={root / 'ckpt'}"])


def test_train_refuses_an_output_without_its_manifest_before_ray_train_starts(tiny, tmp_path):
    from agentflan_ray.jobs.train import run as run_train

    half_written = tmp_path / "half"
    (half_written / "general").mkdir(parents=True)
    (half_written / "general/part-00000.parquet").write_bytes((tiny / "data/general/part-00000.parquet").read_bytes())
    started = time.monotonic()
    with pytest.raises(IncompleteOutput, match=r"half/manifest.json not found: .* is not a finished job output"):
        run_train(train_config(tiny, half_written), log=lambda *_: None)  # no Ray session needed: it stops first
    assert time.monotonic() - started < 10
    chat_output = tmp_path / "chat"
    chat_output.mkdir()
    (chat_output / "manifest.json").write_text(json.dumps({"job": "chat", "files": []}))
    with pytest.raises(IncompleteOutput, match=r"is a `chat` output, not training samples \(a generate or negatives output\)"):
        run_train(train_config(tiny, chat_output), log=lambda *_: None)


def test_train_reads_exactly_the_files_the_manifest_lists(ray_session, tiny):
    from agentflan_ray.training.data import prepare_dataset

    listed = read_manifest(str(tiny / "data"), StorageConfig(), "generate")
    stray = tiny / "data/general/part-00001.parquet"
    stray.write_bytes((tiny / "data/general/part-00000.parquet").read_bytes())  # not in the manifest
    try:
        _, report = prepare_dataset(train_config(tiny, tiny / "data"))
    finally:
        stray.unlink()
    assert report["samples"] == listed["counts"]["written"] == 51


def test_train_mixes_several_outputs_by_their_manifests_with_stream_weights_and_shares(ray_session, tiny, tmp_path):
    """A generate output and a negatives output: only the negatives' `negative` folder is training data
    (dropped cases and the held-out Agent-H set are not); weights repeat or thin a stream, shares
    solve its weight; the report counts samples and trained tokens per root and stream."""
    from agentflan_ray.config import ConfigError
    from agentflan_ray.jobs.train import preflight
    from agentflan_ray.training.data import prepare_dataset
    from agentflan_ray.writing.manifest import write_output
    from agentflan_ray.writing.shards import sample_schema

    generated = pq.read_table(tiny / "data/general/part-00000.parquet").to_pylist()[:48]  # the good ones
    negatives = tmp_path / "negatives"
    rows = lambda prefix, n: [{**generated[0], "id": f"{prefix}{i}", "stream": "negative"} for i in range(n)]  # noqa: E731
    write_output(str(negatives), StorageConfig(), "negatives",
                 {"negative": rows("n", 20), "dropped": rows("d", 7), "agent_h": rows("h", 9)}, sample_schema)
    data = f"data=[{tiny / 'data'}, {negatives}]"

    config = load_config(TrainConfig, None, [data, f"model={tiny / 'model'}", "max_seq_len=128", "global_batch=4",
                                             "num_workers=1", "weights={negative: 2.5}"])
    _, report = prepare_dataset(preflight(config))
    gen, neg = report["sources"][str(tiny / "data")], report["sources"][str(negatives)]
    assert set(neg) == {"negative"} and neg["negative"]["files_rows"] == 20
    assert 40 < neg["negative"]["samples"] < 60  # each twice, half of them three times
    assert gen["general"]["samples"] == 51 and gen["general"]["weight"] == 1.0
    assert report["samples"] == neg["negative"]["samples"] + 51
    assert neg["negative"]["trained_tokens"] == 10 * neg["negative"]["samples"]  # the answer's tokens, each copy
    assert gen["general"]["trained_tokens"] + neg["negative"]["trained_tokens"] == sum(report["trained_tokens"].values())

    shared = load_config(TrainConfig, None, [data, f"model={tiny / 'model'}", "max_seq_len=128", "global_batch=4",
                                             "num_workers=1", "weights={negative: 2}", "shares={general: 0.5}"])
    _, report = prepare_dataset(preflight(shared))
    assert report["sources"][str(negatives)]["negative"]["samples"] == 40
    general = report["sources"][str(tiny / "data")]["general"]
    assert general["weight"] == round(40 / 51, 4) and 30 <= general["samples"] <= 50

    with pytest.raises(ConfigError, match="weights/shares: no stream 'chat' in the data; its streams are"):
        preflight(load_config(TrainConfig, None, [data, f"model={tiny / 'model'}", "shares={chat: 0.2}",
                                                  "num_workers=1", "global_batch=4"]))


def digests(root: Path) -> dict[str, str]:
    """Every file of a job's output as its manifest lists it, plus the manifest without what describes
    one run rather than the output (time taken, the budget, requests made or answered from the cache)."""
    manifest = json.loads((root / "manifest.json").read_text())
    files = {e["path"]: hashlib.sha256((root / e["path"]).read_bytes()).hexdigest() for e in manifest["files"]}
    for run_specific in ("seconds", "budget", "llm"):
        manifest.pop(run_specific, None)
    return {**files, "manifest": manifest}


def test_jobs_whose_roots_share_a_prefix_never_touch_each_others_files(ray_session, sample_data, simulator, tmp_path):
    """generate in out/, chat nested in out/general/ (a folder generate itself writes), generate again
    in the sibling out2/: each rerun twice in turn leaves all three complete and byte-identical."""
    from agentflan_ray.jobs.chat import ChatConfig
    from agentflan_ray.jobs.chat import run as run_chat
    from agentflan_ray.jobs.generate import GenerateConfig
    from agentflan_ray.jobs.generate import run as generate

    _, url = simulator()
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                for i in range(20)))
    roots = {"out": tmp_path / "out", "nested": tmp_path / "out" / "general", "sibling": tmp_path / "out2"}
    jobs = {
        "out": lambda: generate(load_config(GenerateConfig, None, demo_overrides(sample_data, roots["out"])),
                                log=lambda *_: None),
        "nested": lambda: run_chat(load_config(ChatConfig, None, [
            f"input={requests}", f"output={roots['nested']}", f"llm.base_url={url}", "llm.model=sim-gpt-4",
            "progress=false"]), log=lambda *_: None),
        "sibling": lambda: generate(load_config(GenerateConfig, None, [
            *demo_overrides(sample_data, roots["sibling"]), "seed=7"]), log=lambda *_: None),
    }
    first = {}
    for name, job in jobs.items():
        job()
        first[name] = digests(roots[name])
    for _ in range(2):
        for name, job in jobs.items():
            job()
            assert {n: digests(r) for n, r in roots.items()} == first, f"after rerunning {name}"
    assert (roots["nested"] / "responses/part-00000.parquet").exists()  # chat's files survived generate's reruns


def test_sibling_and_nested_roots_on_s3(ray_session, sample_data, s3_server, s3_bucket):
    """On S3 a root is a key prefix: run1 must not see run10's keys, nor run1/nested's."""
    import boto3

    from agentflan_ray.jobs.generate import GenerateConfig
    from agentflan_ray.jobs.generate import run as generate

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in sample_data.rglob("*.json"):
        s3.upload_file(str(path), s3_bucket, f"in/{path.relative_to(sample_data)}")
    roots = [f"s3://{s3_bucket}/run1", f"s3://{s3_bucket}/run10", f"s3://{s3_bucket}/run1/tflan_cot/more"]

    def snapshot() -> dict:
        listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix="run1")["Contents"]
        return {o["Key"]: o["ETag"] for o in listing if not o["Key"].endswith("manifest.json")}

    for root in roots:
        generate(load_config(GenerateConfig, None, demo_overrides(f"s3://{s3_bucket}/in", root)), log=lambda *_: None)
    before = snapshot()
    assert any(k.startswith("run10/") for k in before) and any(k.startswith("run1/tflan_cot/more/") for k in before)
    for root in roots:
        generate(load_config(GenerateConfig, None, demo_overrides(f"s3://{s3_bucket}/in", root)), log=lambda *_: None)
        assert snapshot() == before
    for root in roots:
        read_manifest(root, StorageConfig(), "generate")


def test_a_missing_input_fails_in_seconds_without_starting_ray(tmp_path):
    script = ("import sys, ray; from agentflan_ray.cli import main; "
              f"code = main(['generate', 'output={tmp_path / 'o'}', 'inputs=[{{format: sharegpt, path: \"{tmp_path}/none/*.json\"}}]']); "
              "print('ray started' if ray.is_initialized() else 'no ray'); sys.exit(code)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert time.monotonic() - started < 5
    assert done.returncode == 2 and done.stdout.strip() == "no ray"
    assert f"inputs: {tmp_path}/none/*.json matched no file" in done.stderr
    assert not (tmp_path / "o").exists()


def test_an_empty_listed_shard_and_quarantine_are_not_training_data(tmp_path):
    from agentflan_ray.writing.manifest import sample_shards, write_output
    from agentflan_ray.writing.shards import sample_schema

    row = {"id": "a", "source": "s", "source_id": "a", "stream": "general", "tools": "[]",
           "messages": [{"role": "user", "content": "q", "loss": False, "capability": None}]}
    quarantined = {"source": "s", "source_id": "b", "reason": "wrong_type", "detail": "", "path": "", "record": ""}
    manifest = write_output(str(tmp_path), StorageConfig(), "generate", {"general": [row], "quarantine": [quarantined]},
                            sample_schema)
    assert manifest["counts"]["read"] == 2 and manifest["counts"]["per_reason"] == {"wrong_type": 1}
    assert sample_shards(str(tmp_path), StorageConfig()) == [str(tmp_path / "general/part-00000.parquet")]
    pq.write_table(pa.Table.from_pylist([], schema=SAMPLE_SCHEMA), tmp_path / "general/part-00007.parquet")
    assert len(sample_shards(str(tmp_path), StorageConfig())) == 1
