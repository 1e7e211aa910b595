"""A two-node Ray cluster on loopback, and the generate job submitted to it with `ray job submit`.

Ray maps 127.0.0.1 to the machine's network address, so the nodes use 127.0.0.2 and 127.0.0.3:
still loopback, and every byte stays on this machine.

The nodes run as `ray start --block` children in their own process group, so tearing them down
never touches the session-wide Ray of the other tests (unlike `ray stop`, which stops every Ray
on the machine).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, demo_overrides, free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
RAY = str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=log.open("w"),
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
              "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))")
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return []
    lines = result.stdout.strip().splitlines()
    return eval(lines[-1]) if result.returncode == 0 and lines else []  # noqa: S307 - our own print


def wait_for_nodes(address: str, env: dict, count: int, head, logs: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError("the head node exited:\n" + (logs / "head.log").read_text()[-3000:])
        if len(alive_nodes(address, env)) == count:
            return
        time.sleep(2)
    raise AssertionError(f"cluster at {address} did not reach {count} nodes")


def test_generate_job_submitted_to_a_two_node_cluster(tmp_path, sample_data):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    gcs, dashboard = free_port(), free_port()
    address = f"127.0.0.2:{gcs}"
    # Ray's socket paths must stay under 107 bytes, which pytest's tmp_path can exceed.
    ray_dir = tempfile.mkdtemp(prefix="afr-ray-", dir="/tmp")
    head = start_node(["--head", f"--port={gcs}", "--node-ip-address=127.0.0.2", "--num-cpus=1",
                       "--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dashboard}",
                       f"--temp-dir={ray_dir}"], env, tmp_path / "head.log")
    worker = None
    try:
        time.sleep(5)
        worker = start_node([f"--address={address}", "--node-ip-address=127.0.0.3", "--num-cpus=1"],
                            env, tmp_path / "worker.log")
        wait_for_nodes(address, env, 2, head, tmp_path)
        out = tmp_path / "out"
        submit = subprocess.run(
            [RAY, "job", "submit", f"--address=http://127.0.0.2:{dashboard}", "--",
             sys.executable, str(REPO / "jobs/generate.py"), "--config", str(REPO / "jobs/configs/demo.yaml"),
             *demo_overrides(sample_data, out), "task_bytes=60000"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["read"] == 51
        assert manifest["counts"]["per_source"]["toolbench"] == {"read": 10, "written": 6, "quarantined": 4}
        assert len(manifest["files"]) > 8  # several read tasks
        assert alive_nodes(address, env) == ["127.0.0.2", "127.0.0.3"]
    finally:
        if worker is not None:
            stop_node(worker)
        stop_node(head)
        shutil.rmtree(ray_dir, ignore_errors=True)
