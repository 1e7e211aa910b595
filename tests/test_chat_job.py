"""The chat job on a real local Ray against the bundled simulator: no row lost or duplicated under
faults, byte-identical reruns, cached replies on rerun after a kill, output and cache on S3, and a
bad key stopping the job at once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, SIM_KEY, kill_and_settle

from agentflan_ray.cli import main
from agentflan_ray.config import load_config
from agentflan_ray.jobs.chat import ChatConfig
from agentflan_ray.jobs.chat import run as run_chat


def write_requests(path: Path, n: int, broken: bool = False) -> list[str]:
    ids = [f"req-{i}" for i in range(n)]
    with open(path, "w") as f:
        for i, row_id in enumerate(ids):
            f.write(json.dumps({"id": row_id, "messages": [{"role": "user", "content": f"question number {i}"}]}) + "\n")
        if broken:
            f.write("{this is not json\n")
            f.write(json.dumps({"id": "no-messages"}) + "\n")
    return ids


def chat_config(requests: Path, out: Path, url: str, *extra: str) -> ChatConfig:
    return load_config(ChatConfig, None, [
        f"input={requests}", f"output={out}", f"llm.base_url={url}", "llm.model=sim-gpt-4", "progress=false",
        "llm.backoff_initial_s=0.05", "llm.backoff_max_s=1", "llm.concurrency=16", "llm.batch_size=32", *extra,
    ])


def read_rows(out: Path) -> list[dict]:
    rows = []
    for folder in ("responses", "dead_letters", "quarantine"):
        if (out / folder).exists():
            rows += pq.read_table(out / folder).to_pylist()
    return rows


def wait_until(condition, timeout: float, what: str, debug=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f": {debug()}" if debug else ""))
        time.sleep(0.1)


@pytest.mark.slow
def test_faults_and_a_tight_limit_lose_and_duplicate_nothing(ray_session, simulator, tmp_path):
    server, url = simulator(latency_s=0.05, rpm=1200, error_500=0.03, error_503=0.02, malformed=0.02)
    ids = write_requests(tmp_path / "requests.jsonl", 240, broken=True)
    # No rpm configured: the budget learns the limit from the x-ratelimit headers.
    manifest = run_chat(chat_config(tmp_path / "requests.jsonl", tmp_path / "out", url), log=lambda *_: None)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == manifest["counts"]["read"] == 242
    assert len({r["id"] for r in rows}) == 242
    assert {r["id"] for r in rows if r["status"] == "ok"} == set(ids)
    quarantined = [r for r in rows if r["status"] == "quarantined"]
    assert sorted(r["error"] for r in quarantined) == ["bad_request: messages: expected a non-empty list",
                                                       "bad_request: not valid JSON"]
    counts = manifest["counts"]
    assert (counts["read"], counts["written"], counts["quarantined"], counts["dead_lettered"]) == (242, 240, 2, 0)
    assert counts["per_reason"] == {"bad_request": 2}
    assert manifest["llm"]["cached"] == 0 and manifest["llm"]["requests"] >= 240
    assert manifest["budget"]["rpm"] == 1200
    stats = server.stats()
    assert stats["faults"].get("error_500", 0) + stats["faults"].get("error_503", 0) > 0
    # 429s come from the first burst, before the limit is learned from the headers.
    assert 0 < stats["status"].get("429", 0) <= 0.1 * stats["answered"]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SIM_KEY.encode() not in path.read_bytes()


@pytest.mark.slow
def test_a_rerun_writes_byte_identical_response_shards(ray_session, simulator, tmp_path):
    """Rows come out in input order whatever order the replies arrive in, and the rerun's answers
    come from the cache: the same bytes, the second time with no request made."""
    server, url = simulator(latency_s=0.02, latency_jitter=0.9)
    requests = tmp_path / "requests.jsonl"
    ids = write_requests(requests, 300)
    config = chat_config(requests, tmp_path / "out", url, "llm.batch_size=16")
    first = run_chat(config, log=lambda *_: None)
    files = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out/responses").glob("*.parquet")}
    assert [r["id"] for r in pq.read_table(tmp_path / "out/responses").to_pylist()] == ids
    answered = server.stats()["answered"]
    second = run_chat(config, log=lambda *_: None)
    assert server.stats()["answered"] == answered  # nothing asked again
    assert (first["llm"]["cached"], second["llm"]["cached"]) == (0, 300)
    again = {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out/responses").glob("*.parquet")}
    assert files and again == files


def test_invalid_key_stops_the_job_within_seconds(ray_session, simulator, tmp_path, monkeypatch, capsys):
    _, url = simulator()
    write_requests(tmp_path / "requests.jsonl", 50)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-the-right-key-42")
    started = time.monotonic()
    code = main(["chat", f"input={tmp_path / 'requests.jsonl'}", f"output={tmp_path / 'out'}",
                 f"llm.base_url={url}", "llm.model=sim-gpt-4"])
    assert code == 2 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "HTTP 401: the API rejected the key" in err and "$OPENAI_API_KEY" in err
    assert "sk-not-the-right" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_rerun_after_a_kill_pays_nothing_for_answered_requests(ray_session, simulator, tmp_path):
    import ray

    server, url = simulator(latency_s=0.05, rpm=600)
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out"
    write_requests(requests, 150)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "agentflan_ray.cli", "chat", f"input={requests}", f"output={out}",
         f"llm.base_url={url}", "llm.model=sim-gpt-4", "llm.concurrency=8", "llm.batch_size=16"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_until(lambda: server.stats()["answered"] >= 50 or job.poll() is not None, 120, "50 answers")
    answered_before, cached = kill_and_settle(job, server, out)
    assert 50 <= answered_before < 150 and cached >= 40
    assert not (out / "manifest.json").exists()

    manifest = run_chat(chat_config(requests, out, url), log=lambda *_: None)
    assert manifest["counts"]["written"] == 150 and manifest["llm"]["cached"] == cached
    stats = server.stats()
    # Only requests answered but killed before their reply reached the cache may be asked twice.
    assert stats["repeated_answers"] == answered_before - cached
    assert stats["unique_prompts_answered"] == 150


def test_output_and_cache_on_s3(ray_session, simulator, s3_server, s3_bucket, tmp_path):
    import boto3

    server, url = simulator(latency_s=0.01)
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 30)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.upload_file(str(requests), s3_bucket, "in/requests.jsonl")
    config = lambda: chat_config(f"s3://{s3_bucket}/in/requests.jsonl", f"s3://{s3_bucket}/chat", url)  # noqa: E731
    first = run_chat(config(), log=lambda *_: None)
    second = run_chat(config(), log=lambda *_: None)
    assert first["counts"]["written"] == second["counts"]["written"] == 30
    assert (first["llm"]["cached"], second["llm"]["cached"]) == (0, 30)
    assert second["llm"]["prompt_tokens"] == 0 < first["llm"]["prompt_tokens"]  # cached replies cost nothing
    assert server.stats()["answered"] == 30
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="chat/")["Contents"]]
    assert "chat/manifest.json" in keys and sum(k.startswith("chat/llm_cache/") for k in keys) == 30
    assert "chat/responses/part-00000.parquet" in keys


def test_shard_files_rotate_and_count_rows_where_they_were_written(tmp_path):
    from agentflan_ray.jobs.chat import RESULT_SCHEMA
    from agentflan_ray.storage import StorageConfig
    from agentflan_ray.writing.shards import ShardWriter

    writer = ShardWriter(str(tmp_path), StorageConfig(), lambda _: RESULT_SCHEMA, row_group_rows=3, rows_per_file=5)
    for i in range(12):
        writer.add("responses", {"id": str(i), "status": "ok", "content": "x", "finish_reason": "stop", "error": "",
                                 "prompt_tokens": 1, "completion_tokens": 1, "_cached": True})
    files = writer.close()
    assert files == {"responses/part-00000.parquet": 5, "responses/part-00001.parquet": 5,
                     "responses/part-00002.parquet": 2}
    ids = []
    for name, rows in files.items():
        assert pq.read_metadata(tmp_path / name).num_rows == rows
        table = pq.read_table(tmp_path / name)
        assert "_cached" not in table.column_names
        ids += table.column("id").to_pylist()
    assert ids == [str(i) for i in range(12)]


def test_parquet_requests_on_s3_are_read_in_order(ray_session, simulator, s3_server, s3_bucket, tmp_path):
    """Parquet input is read by light per-file tasks (read_parquet's listing task needs a whole CPU and
    never starts beside the stage's actors on a 1-CPU node)."""
    import boto3
    import pyarrow as pa

    _, url = simulator(latency_s=0.01)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for part in range(2):
        lines = [json.dumps({"id": f"p{part}-{i}", "messages": [{"role": "user", "content": f"q {part} {i}"}]})
                 for i in range(15)]
        pq.write_table(pa.table({"request": lines}), tmp_path / f"part-{part}.parquet", row_group_size=4)
        s3.upload_file(str(tmp_path / f"part-{part}.parquet"), s3_bucket, f"in/part-{part}.parquet")
    manifest = run_chat(chat_config(f"s3://{s3_bucket}/in/*.parquet", tmp_path / "out", url, "llm.batch_size=4"),
                        log=lambda *_: None)
    assert manifest["counts"]["written"] == 30
    ids = [r["id"] for r in pq.read_table(tmp_path / "out/responses").to_pylist()]
    assert ids == [f"p{part}-{i}" for part in range(2) for i in range(15)]
