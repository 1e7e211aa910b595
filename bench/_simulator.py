"""`serve-sim` in its own process for the benchmarks, and its /stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request


def stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats?times=1", timeout=30) as response:
        return json.loads(response.read())


def reset_stats(base_url: str) -> None:
    request = urllib.request.Request(base_url.removesuffix("/v1") + "/stats/reset", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass


def start_simulator(*flags: str, port_base: int) -> tuple[subprocess.Popen, str]:
    """``(process, base_url)`` once the simulator answers; ``flags`` as for ``serve-sim``."""
    port = port_base + os.getpid() % 400
    server = subprocess.Popen([sys.executable, "-m", "agentflan_ray.cli", "serve-sim", "--port", str(port), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            stats(base_url)
            break
        except OSError:
            time.sleep(0.1)
    return server, base_url


def rate_bound(rpm: int, actors: int, concurrency: int, latency: float) -> float:
    """Answers per second a run can reach: the RPM limit, or what the actors keep in flight."""
    return min(rpm / 60, actors * concurrency / latency)


def rate_figures(sim: dict, bound: float) -> dict:
    """From the simulator's /stats: answers per second over the answering window, against ``bound``,
    and the share of requests it answered 429."""
    times = sim["answer_times"] or [0.0]
    per_s = len(times) / max(times[-1] - times[0], 1e-9)
    return {"answers_per_s": round(per_s, 1), "bound_per_s": round(bound, 1), "of_bound": round(per_s / bound, 3),
            "share_429": round(sim["status"].get("429", 0) / max(sum(sim["status"].values()), 1), 4)}
