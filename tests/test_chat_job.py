"""The chat job on a real local Ray against the bundled simulator: no row lost or duplicated under
faults, cached replies on rerun after a kill, and a bad key stopping the job at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO

from agentflan_ray.cli import main
from agentflan_ray.config import ChatRunConfig, load_config
from agentflan_ray.llm.run import run_chat
from agentflan_ray.llm.simulator import SimulatorConfig, SimulatorServer

KEY = "sk-chat-job-secret-0123456789"


@pytest.fixture
def simulator(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    servers = []

    def start(**kwargs):
        server = SimulatorServer(SimulatorConfig(port=0, api_key=KEY, **kwargs))
        servers.append(server)
        return server, server.start()

    yield start
    for server in servers:
        server.stop()


def write_requests(path: Path, n: int, broken: bool = False) -> list[str]:
    ids = [f"req-{i}" for i in range(n)]
    with open(path, "w") as f:
        for i, row_id in enumerate(ids):
            f.write(json.dumps({"id": row_id, "messages": [{"role": "user", "content": f"question number {i}"}]}) + "\n")
        if broken:
            f.write("{this is not json\n")
            f.write(json.dumps({"id": "no-messages"}) + "\n")
    return ids


def chat_config(requests: Path, out: Path, url: str, *extra: str) -> ChatRunConfig:
    return load_config(ChatRunConfig, None, [
        f"input={requests}", f"output={out}", f"llm.base_url={url}", "llm.model=sim-gpt-4", "progress=false",
        "llm.backoff_initial_s=0.05", "llm.backoff_max_s=1", "llm.concurrency=16", "llm.batch_size=32", *extra,
    ])


def read_rows(out: Path) -> list[dict]:
    rows = []
    for folder in ("responses", "dead_letters"):
        if (out / folder).exists():
            rows += pq.read_table(out / folder).to_pylist()
    return rows


@pytest.mark.slow
def test_faults_and_a_tight_limit_lose_and_duplicate_nothing(ray_session, simulator, tmp_path):
    server, url = simulator(latency_s=0.05, rpm=1200, error_500=0.03, error_503=0.02, malformed=0.02)
    ids = write_requests(tmp_path / "requests.jsonl", 240, broken=True)
    # No rpm configured: the budget learns the limit from the x-ratelimit headers.
    manifest = run_chat(chat_config(tmp_path / "requests.jsonl", tmp_path / "out", url), log=lambda *_: None)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == manifest["counts"]["read"] == 242
    assert len({r["id"] for r in rows}) == 242
    ok = {r["id"] for r in rows if r["status"] == "ok"}
    dead = [r for r in rows if r["status"] == "dead_letter"]
    assert ok == set(ids)
    assert sorted(r["error"] for r in dead) == ["messages: expected a non-empty list", "request: not valid JSON"]
    assert manifest["counts"] == {"read": 242, "ok": 240, "dead_letter": 2, "cached": 0}
    assert manifest["budget"]["rpm"] == 1200
    stats = server.stats()
    assert stats["faults"].get("error_500", 0) + stats["faults"].get("error_503", 0) > 0
    # 429s come from the first burst, before the limit is learned from the headers.
    assert 0 < stats["status"].get("429", 0) <= 0.1 * stats["answered"]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes()


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
    assert not (tmp_path / "out" / "responses").exists()


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
    deadline = time.monotonic() + 120
    while server.stats()["answered"] < 50 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(30)
    time.sleep(2)  # the killed driver's actors finish dying
    answered_before = server.stats()["answered"]
    cached = len(list((out / "llm_cache").rglob("*.json")))
    assert 50 <= answered_before < 150 and cached >= 40

    manifest = run_chat(chat_config(requests, out, url), log=lambda *_: None)
    assert manifest["counts"]["ok"] == 150 and manifest["counts"]["cached"] == cached
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
    assert first["counts"] == {"read": 30, "ok": 30, "dead_letter": 0, "cached": 0}
    assert second["counts"] == {"read": 30, "ok": 30, "dead_letter": 0, "cached": 30}
    assert server.stats()["answered"] == 30
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="chat/")["Contents"]]
    assert "chat/manifest.json" in keys and sum(k.startswith("chat/llm_cache/") for k in keys) == 30


def test_result_files_rotate_and_count_rows_where_they_were_written(tmp_path, monkeypatch):
    import pyarrow as pa

    from agentflan_ray.config import StorageConfig
    from agentflan_ray.llm import run as chat_run
    from agentflan_ray.llm.stage import RESULT_SCHEMA

    monkeypatch.setattr(chat_run, "ROWS_PER_FILE", 5)
    writer = chat_run.ResultWriter(str(tmp_path), StorageConfig())
    for batch in range(3):
        rows = [{"id": f"{batch}-{i}", "status": "ok", "content": "x", "finish_reason": "stop", "error": "",
                 "prompt_tokens": 1, "completion_tokens": 1, "attempts": 1, "cached": False} for i in range(4)]
        writer.write(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    files = writer.close()
    assert files == {"responses/part-00000.parquet": 8, "responses/part-00001.parquet": 4}
    for name, rows in files.items():
        assert pq.read_metadata(tmp_path / name).num_rows == rows
