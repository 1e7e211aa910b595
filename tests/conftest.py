"""Shared fixtures: one local Ray per session, moto's S3 *server* on loopback, the sample data.

The S3 server is real HTTP on 127.0.0.1; code reaches it through ``AWS_ENDPOINT_URL`` exactly as it
would reach AWS or MinIO. It starts before Ray so Ray's workers inherit the endpoint and the fake
credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest

# A single-node local Ray binds to 127.0.0.1 instead of the machine's network address (Ray does the
# same on macOS). Read by Ray at import time, so set before anything imports it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition()`` until it returns something truthy, and return that; fail naming ``what``
    after ``timeout`` seconds. A fixed sleep is either too short on a loaded machine or wasted time."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return value


def other_jobs_actors() -> list[str]:
    """Live actors of this test's Ray that belong to a job other than this test process's and die
    with it (detached ones, such as Ray Data's statistics actor, outlive every job)."""
    import ray
    import ray._private.state

    own = ray.get_runtime_context().get_job_id()
    return [a["ActorClassName"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["JobID"] != own and not a["IsDetached"]]


def kill_and_settle(job, server, out) -> tuple[int, int]:
    """SIGKILL a job started in its own session, wait until its actors on this test's Ray are gone and
    the simulator has read and answered everything they had sent; ``(answered, cached replies)``."""
    import signal

    os.killpg(job.pid, signal.SIGKILL)
    job.wait(30)
    # The killed driver's actors die with it; the simulator still answers what they had sent (nobody
    # reads it, nobody caches it), and what they sent may still sit unread in its sockets.
    wait_until(lambda: not other_jobs_actors(), 60, "the killed job's actors to die")
    wait_until(lambda: (s := server.stats())["in_flight"] == 0 and s["other_connections"] == 0, 30,
               "the simulator to answer what was in flight")
    return server.stats()["answered"], len(list((out / "llm_cache").rglob("*.json")))


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-access-key",
        AWS_SECRET_ACCESS_KEY="testing-secret-key-do-not-log",
        AWS_ENDPOINT_URL=endpoint,
        AWS_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


SIM_KEY = "sk-simulator-test-key-0123456789"  # the simulator's key: any other gets 401


@pytest.fixture
def simulator(monkeypatch):
    """``start(**SimulatorConfig fields) -> (server, base_url)``: the bundled OpenAI-compatible
    simulator on a free port of 127.0.0.1, stopped after the test; $OPENAI_API_KEY holds its key."""
    from agentflan_ray.llm.simulator import SimulatorConfig, SimulatorServer

    monkeypatch.setenv("OPENAI_API_KEY", SIM_KEY)
    servers = []

    def start(**kwargs):
        server = SimulatorServer(SimulatorConfig(**{"port": 0, "latency_s": 0.01, "api_key": SIM_KEY, **kwargs}))
        servers.append(server)
        return server, server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def sample_data(tmp_path) -> Path:
    """A writable copy of the real sample records."""
    target = tmp_path / "data"
    shutil.copytree(FIXTURES, target)
    return target


def demo_overrides(data: Path, output: Path | str) -> list[str]:
    return [
        f"output={output}",
        "progress=false",
        f'inputs=[{{format: toolbench, path: "{data}/toolbench/**/*.json"}}, '
        f'{{format: agentinstruct, path: "{data}/agentinstruct/*.json"}}, '
        f'{{format: sharegpt, path: "{data}/sharegpt/*.json"}}, '
        f'{{format: agentflan, path: "{data}/agentflan/*.json"}}]',
        "instruct_share=0.5",
    ]


ANSWER = "The capital of France is Paris."


def write_tiny_data(root):
    """48 copies of one short conversation, the bad samples below, an empty shard, and a tiny model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agentflan_ray.records import SAMPLE_SCHEMA
    from agentflan_ray.training.tiny_model import make_tiny_model

    messages = [
        {"role": "system", "content": "You answer briefly.", "loss": False, "capability": None},
        {"role": "user", "content": "What is the capital of France?", "loss": False, "capability": None},
        {"role": "assistant", "content": ANSWER, "loss": True, "capability": "reasoning"},
    ]
    rows = [{"id": f"s{i}", "source": "synthetic", "source_id": f"s{i}", "stream": "general", "messages": messages,
             "tools": "[]"} for i in range(48)]
    # Bad data, each counted and skipped: no trained turn, no assistant turn, longer than max_seq_len
    # (with overlong=drop), and a shard with no rows.
    rows.append({**rows[0], "id": "silent", "messages": [dict(m, loss=False) for m in messages]})
    rows.append({**rows[0], "id": "no-assistant", "messages": messages[:2]})
    long_turn = dict(messages[2], content="Paris " * 200)
    rows.append({**rows[0], "id": "long", "messages": [*messages[:2], long_turn]})
    write_samples(root / "data", {"general": rows})
    # An empty shard the manifest lists (as a generate read task that kept nothing would leave it).
    (root / "data" / "empty").mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=SAMPLE_SCHEMA), root / "data/empty/part-00000.parquet")
    manifest = json.loads((root / "data/manifest.json").read_text())
    manifest["files"].append({"path": "empty/part-00000.parquet", "rows": 0})
    (root / "data/manifest.json").write_text(json.dumps(manifest))
    make_tiny_model(str(root / "data"), str(root / "model"), hidden=64, layers=2, vocab_size=300)
    return root


def write_samples(output: Path, streams: dict[str, list[dict]]) -> dict:
    """A finished generate output (shards + manifest) holding these sample rows per stream."""
    from agentflan_ray.storage import StorageConfig
    from agentflan_ray.writing.manifest import write_output
    from agentflan_ray.writing.shards import sample_schema

    return write_output(str(output), StorageConfig(), "generate", streams, sample_schema)


def registered_checkpoints(snapshot_text: str) -> list[dict]:
    """Metrics (step, world_size, ...) of the checkpoints Ray Train has registered, from its
    checkpoint_manager_snapshot.json. A checkpoint whose files exist but which the controller has
    not yet taken in (it polls the workers every 2 s) is not one a restarted group resumes from."""
    return [result["metrics"] for result in json.loads(snapshot_text)["checkpoint_results"]]
