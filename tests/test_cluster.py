"""A two-node Ray cluster on loopback, and the generate job submitted to it with `ray job submit`.

Ray maps 127.0.0.1 to the machine's network address, so the nodes use 127.0.0.2 and 127.0.0.3:
still loopback, and every byte stays on this machine.

The nodes run as `ray start --block` children in their own process group, so tearing them down
never touches the session-wide Ray of the other tests (unlike `ray stop`, which stops every Ray
on the machine).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, demo_overrides, free_port, registered_checkpoints, wait_until, write_tiny_data

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
RAY = str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Free ports for every per-node agent: the session-wide Ray of the other tests holds the defaults.
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    return subprocess.Popen([RAY, "start", "--block", *args, *ports], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def alive_nodes(address: str, env: dict) -> list[str]:
    script = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
              "import json; print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return []
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if result.returncode == 0 and lines else []


def wait_for_nodes(address: str, env: dict, count: int, head, logs: Path, timeout: float = 90) -> None:
    def reached() -> bool:
        if head.poll() is not None:
            raise AssertionError("the head node exited:\n" + (logs / "head.log").read_text()[-3000:])
        return len(alive_nodes(address, env)) == count

    wait_until(reached, timeout, f"the cluster at {address} to have {count} live nodes", interval=1)


KEY = "sk-cluster-test-key-987654321"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """Head on 127.0.0.2 and a worker on 127.0.0.3, one CPU each, token auth; the API key and the
    (moto) S3 endpoint and credentials live in the nodes' environment, as on a production cluster."""
    logs = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", OPENAI_API_KEY=KEY)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    gcs, dashboard = free_port(), free_port()
    address = f"127.0.0.2:{gcs}"
    # Ray's socket paths must stay under 107 bytes, which pytest's tmp_path can exceed.
    ray_dir = tempfile.mkdtemp(prefix="afr-ray-", dir="/tmp")
    head = start_node(["--head", f"--port={gcs}", "--node-ip-address=127.0.0.2", "--num-cpus=1",
                       '--resources={"cpu_node": 100}',  # the CPU node of placement (cluster/); the worker is not
                       "--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dashboard}",
                       f"--temp-dir={ray_dir}"], env, logs / "head.log")
    worker = None
    try:
        wait_for_nodes(address, env, 1, head, logs)  # the worker node needs the head's GCS up
        worker = start_node([f"--address={address}", "--node-ip-address=127.0.0.3", "--num-cpus=1"],
                            env, logs / "worker.log")
        wait_for_nodes(address, env, 2, head, logs)
        yield {"address": address, "dashboard": f"http://127.0.0.2:{dashboard}", "env": env, "worker": lambda: worker}
    finally:
        if worker is not None:
            stop_node(worker)
        stop_node(head)
        shutil.rmtree(ray_dir, ignore_errors=True)


def submit(cluster, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head's job agent is still starting (nothing was submitted)."""
    results = []

    def taken() -> bool:
        results.append(subprocess.run([RAY, "job", "submit", f"--address={cluster['dashboard']}", "--",
                                       sys.executable, *args], env=cluster["env"], capture_output=True, text=True,
                                      timeout=timeout))
        return "No available agent to submit job" not in results[-1].stderr + results[-1].stdout

    wait_until(taken, 120, "the head's job agent to take a job", interval=3)
    return results[-1]


def test_generate_job_submitted_to_a_two_node_cluster(cluster, tmp_path, sample_data):
    out = tmp_path / "out"
    result = submit(cluster, str(REPO / "jobs/generate.py"), "--config", str(REPO / "jobs/configs/demo.yaml"),
                    *demo_overrides(sample_data, out), "task_bytes=60000")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["read"] == 51
    assert manifest["counts"]["per_source"]["toolbench"] == {"read": 10, "written": 6, "quarantined": 4,
                                                             "dead_lettered": 0}
    assert len(manifest["files"]) > 8  # several read tasks
    assert alive_nodes(cluster["address"], cluster["env"]) == ["127.0.0.2", "127.0.0.3"]


def test_shared_budget_holds_the_rpm_across_nodes(cluster, tmp_path):
    """Two actors that could each send 320 requests/s share one 600 RPM budget: any minute of the
    run sees 600 requests, within 2%."""
    from agentflan_ray.llm.simulator import SimulatorConfig, SimulatorServer

    server = SimulatorServer(SimulatorConfig(port=0, latency_s=0.05, latency_jitter=0.0, api_key=KEY))
    url = server.start()
    try:
        requests = tmp_path / "requests.jsonl"
        with open(requests, "w") as f:
            for i in range(680):
                f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"budget probe {i}"}]}) + "\n")
        result = submit(cluster, "-m", "agentflan_ray.cli", "chat", f"input={requests}", f"output={tmp_path / 'out'}",
                        f"llm.base_url={url}", "llm.model=sim-gpt-4", "llm.rpm=600", "llm.actors=2",
                        "llm.concurrency=16", "llm.batch_size=20", timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        times = server.stats(times=True)["answer_times"]
    finally:
        server.stop()
    assert len(times) == 680
    start = times[0]
    first_minute = sum(1 for t in times if start <= t < start + 60)
    busiest = max(sum(1 for t in times if s <= t < s + 60) for s in times if s + 60 <= times[-1] + 1e-9)
    assert abs(first_minute - 600) <= 12, first_minute
    assert busiest <= 612, busiest



def test_llm_rewrite_submitted_with_s3_input_and_output_holds_the_shared_budget(cluster, tmp_path, sample_data,
                                                                                  s3_bucket, s3_server):
    """`rewrite: llm` on both nodes: input and output on S3, one 240 RPM budget for every actor."""
    import boto3

    from agentflan_ray.llm.simulator import SimulatorConfig, SimulatorServer

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in sample_data.rglob("*.json"):
        s3.upload_file(str(path), s3_bucket, f"in/{path.relative_to(sample_data)}")
    server = SimulatorServer(SimulatorConfig(port=0, latency_s=0.05, api_key=KEY, corrupt=0.2))
    url = server.start()
    try:
        result = submit(cluster, str(REPO / "jobs/generate.py"), "--config", str(REPO / "jobs/configs/demo.yaml"),
                        *demo_overrides(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"), "task_bytes=60000",
                        "rewrite=llm", f"llm.base_url={url}", "llm.model=sim-gpt-4", "llm.rpm=240", "llm.actors=2",
                        "llm.concurrency=8", "llm.batch_size=4", timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        times = server.stats(times=True)["answer_times"]
    finally:
        server.stop()
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/manifest.json")["Body"].read())
    rewrite = manifest["rewrite"]
    assert manifest["counts"]["read"] == 51 and rewrite["asked"] == 36
    assert rewrite["rewritten"] + rewrite["partly_rewritten"] + rewrite["template"] == 36
    assert rewrite["budget"]["rpm"] == 240 and rewrite["budget"]["granted"] >= rewrite["requests"] == len(times)
    # 240 RPM with half a second of burst: no 10-second window holds more than 40 + 2 starts, and
    # latency jitter can move one more answer across the window's edge.
    assert max(sum(1 for t in times if s <= t < s + 10) for s in times) <= 43
    assert KEY not in result.stdout + result.stderr


def pipeline_overrides(sample_data, tmp_path, output: str) -> list[str]:
    inputs = next(o for o in demo_overrides(sample_data, "unused") if o.startswith("inputs="))
    return [f"output={output}", f"tiny_model={tmp_path / 'tiny'}", "progress=false", f"generate.{inputs}",
            "placement.cpu_resource=cpu_node", "negatives.count=30", "negatives.agent_h_count=10",
            f"negatives.tool_catalogs=[{REPO / 'tests/fixtures/teval/api_descrip.json'}]",
            "train.max_steps=6", "train.checkpoint_every=2", "train.max_seq_len=512",
            f"eval.sets=[{REPO / 'jobs/configs/eval_demo_tool_call.jsonl'}]", "eval.max_new_tokens=8"]


def test_pipeline_submitted_with_s3_output_resumes_after_its_driver_is_killed(cluster, tmp_path, sample_data,
                                                                                 s3_bucket):
    """`jobs/pipeline.py` on both nodes, output on S3, the simulator and a tiny model: the driver is
    stopped once generate and negatives have finished; the resubmitted job skips them, trains and
    evaluates. Data and LLM work ran only on the node that declares cpu_node."""
    import boto3

    from agentflan_ray.writing.accounting import all_accounted

    s3 = boto3.client("s3")
    args = [str(REPO / "jobs/pipeline.py"), "--config", str(REPO / "jobs/configs/pipeline_demo.yaml"),
            *pipeline_overrides(sample_data, tmp_path, f"s3://{s3_bucket}/pipe")]
    started = subprocess.run([RAY, "job", "submit", f"--address={cluster['dashboard']}", "--no-wait", "--",
                              sys.executable, *args], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", started.stdout).group(0)

    def finished_stages() -> list[str]:
        try:
            state = json.loads(s3.get_object(Bucket=s3_bucket, Key="pipe/pipeline.json")["Body"].read())
        except s3.exceptions.NoSuchKey:
            return []
        return sorted(state["stages"])

    def logs() -> str:
        return subprocess.run([RAY, "job", "logs", f"--address={cluster['dashboard']}", job_id], env=cluster["env"],
                              capture_output=True, text=True, timeout=60).stdout

    wait_until(lambda: finished_stages() == ["generate", "negatives"] or "Traceback" in logs(), 600,
               "generate and negatives to finish")
    assert finished_stages() == ["generate", "negatives"], logs()[-5000:]
    subprocess.run([RAY, "job", "stop", f"--address={cluster['dashboard']}", job_id], env=cluster["env"],
                   capture_output=True, text=True, timeout=120, check=True)
    assert "[pipeline] summary" not in logs()

    result = submit(cluster, *args, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "[pipeline] generate: skipped" in result.stdout and "[pipeline] negatives: skipped" in result.stdout
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="pipe/manifest.json")["Body"].read())
    assert manifest["stages"] == {"generate": "skipped", "negatives": "skipped", "train": "ran", "eval": "ran"}
    for stage in ("generate", "negatives", "train", "eval"):
        stage_manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"pipe/{stage}/manifest.json")["Body"].read())
        assert stage_manifest["job"] == stage and all_accounted(stage_manifest["counts"]), stage
    summary = manifest["summary"]
    assert summary["steps"] == 6 and summary["trained_tokens"] > 0 and summary["H_Score"] is not None
    assert summary["negatives_samples"]["negative"] > 0 and "tool_call/general" in summary["correct_by_group"]
    assert s3.head_object(Bucket=s3_bucket, Key="pipe/train/model/config.json")
    assert KEY not in result.stdout + result.stderr
    submissions = [job_id, re.search(r"raysubmit_[A-Za-z0-9]+", result.stdout).group(0)]
    assert node_ips_of(cluster, submissions, ("run_read_task", "material_task", "LLMStage")) == {"127.0.0.2"}


def node_ips_of(cluster, submissions: list[str], names: tuple[str, ...]) -> set[str]:
    """The nodes on which the tasks and actor tasks of these job submissions whose names hold one of
    ``names`` ran (from Ray's state API; the other tests' jobs ran on this cluster too)."""
    # The state API is told the address: the other tests' Ray runs on this machine too.
    script = ("import json; from ray.util.state import list_jobs, list_nodes, list_tasks; "
              f"a = {cluster['address']!r}; "
              f"jobs = {{j.job_id for j in list_jobs(address=a) if j.submission_id in {submissions!r}}}; "
              "ips = {n.node_id: n.node_ip for n in list_nodes(address=a)}; "
              "print(json.dumps(sorted({(t.name, ips.get(t.node_id)) for t in list_tasks(address=a, limit=10000) "
              f"if t.node_id and t.job_id in jobs and any(k in t.name for k in {list(names)!r})}})))")
    result = subprocess.run([sys.executable, "-c", script], env=cluster["env"], capture_output=True, text=True,
                            timeout=120)
    placed = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else []
    assert placed, result.stdout[-1000:] + result.stderr[-2000:]
    return {ip for _, ip in placed}


def test_elastic_training_survives_losing_a_node(cluster, tmp_path, s3_bucket):
    """`jobs/train.py` with num_workers [1, 2] trains on both nodes, checkpointing to S3; the worker
    node is stopped mid-run, and the job finishes on the head alone: the ZeRO checkpoint of two
    ranks is converted for one, the step and the data position carry on. (Runs last: the cluster
    is down to one node afterwards.)"""
    import boto3

    write_tiny_data(tmp_path)
    s3 = boto3.client("s3")
    scratch, log = tmp_path / "scratch", tmp_path / "job.log"
    with log.open("w") as out:  # a file, not a pipe nobody reads while the job runs
        job = subprocess.Popen(
            [RAY, "job", "submit", f"--address={cluster['dashboard']}", "--", sys.executable,
             str(REPO / "jobs/train.py"), f"data={tmp_path / 'data'}", f"model={tmp_path / 'model'}",
             "max_seq_len=128", "global_batch=4", "num_workers=[1, 2]", "cpus_per_worker=1",
             "elastic_resize_interval_s=5", "lr=0.003", "warmup_ratio=0", "max_steps=48", "checkpoint_every=4",
             f"storage_path=s3://{s3_bucket}/ckpt", "run_name=elastic", "overlong=drop", f"scratch_dir={scratch}"],
            env=cluster["env"], stdout=out, stderr=subprocess.STDOUT)

    def step_8_on_two_workers_or_ended() -> str | None:
        try:
            snapshot = s3.get_object(Bucket=s3_bucket, Key="ckpt/elastic/checkpoint_manager_snapshot.json")
            registered = registered_checkpoints(snapshot["Body"].read().decode())
        except s3.exceptions.NoSuchKey:
            registered = []
        if any(c["step"] >= 8 and c["world_size"] == 2 for c in registered):
            return "checkpointed"
        return "ended" if job.poll() is not None else None

    try:
        seen = wait_until(step_8_on_two_workers_or_ended, 400, "a registered step-8 checkpoint of two workers",
                          interval=0.5)
        assert seen == "checkpointed", "the run never checkpointed step 8 on two workers:\n" + log.read_text()[-3000:]
        stop_node(cluster["worker"]())
        wait_until(lambda: job.poll() is not None, 400, "the job to finish on the head alone", interval=1)
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-5000:]
    summary = json.loads(output.split("[train] summary ", 1)[1].splitlines()[0])
    metrics = summary["metrics"]
    assert metrics["step"] == 48 and metrics["world_size"] == 1, metrics
    assert metrics["resumed_from"] >= 8 and metrics["rows_out_of_order"] == 0, output[-6000:]
    converted = scratch / "agentflan-universal"  # the head's copy for one rank, under scratch_dir, removed
    assert converted.is_dir() and not any(converted.iterdir()), output[-6000:]
