"""LLM request throughput: this project's Ray stage vs a plain AsyncOpenAI + semaphore script.

    python bench/llm_throughput.py --latency 0.5 --rpm 6000 --requests 3000 --concurrency 64
    python bench/llm_throughput.py --latency 0.2 --rpm 0 --requests 10000 --concurrency 64

Starts the bundled simulator (`agentflan-ray serve-sim`) in its own process unless --base-url is
given, then runs both clients against it, resetting its stats in between. Prints one JSON line per
client: ok, failed, seconds (first to last answer, as the simulator saw them), rps, the share of
requests answered 429, the bound min(rpm/60, in-flight/latency), and client CPU seconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _simulator import reset_stats, start_simulator, stats  # noqa: E402


def cpu_seconds() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            if "serve-sim" not in " ".join(child.cmdline()):
                total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def summary(name: str, sim: dict, ok: int, failed: int, args, cpu: float) -> dict:
    times = sim["answer_times"] or [0.0]
    seconds = max(times[-1] - times[0], 1e-9)
    total = sum(sim["status"].values())
    bound = min(args.rpm / 60 if args.rpm else float("inf"), args.concurrency * args.actors / args.latency)
    return {
        "client": name, "ok": ok, "failed": failed, "seconds": round(seconds, 2), "rps": round(ok / seconds, 1),
        "bound_rps": round(bound, 1), "of_bound": round(ok / seconds / bound, 3) if bound != float("inf") else None,
        "share_429": round(sim["status"].get("429", 0) / max(total, 1), 4),
        "cpu_ms_per_request": round(1000 * cpu / max(ok, 1), 2),
    }


async def plain_client(base_url: str, requests: int, concurrency: int) -> tuple[int, int]:
    """What a hand-written script does: AsyncOpenAI with its default retries and a semaphore."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with semaphore:
            try:
                await client.chat.completions.create(model="sim-gpt-4", max_tokens=64,
                                                     messages=[{"role": "user", "content": f"plain request {i}"}])
                return True
            except openai.OpenAIError:
                return False

    results = await asyncio.gather(*(one(i) for i in range(requests)))
    return sum(results), requests - sum(results)


def ray_client(base_url: str, args, workdir: Path) -> tuple[int, int]:
    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.chat import ChatConfig
    from agentflan_ray.jobs.chat import run as run_chat

    requests = workdir / "requests.jsonl"
    with open(requests, "w") as f:
        for i in range(args.requests):
            f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"ray request {i}"}]}) + "\n")
    config = load_config(ChatConfig, None, [
        f"input={requests}", f"output={workdir / 'out'}", f"llm.base_url={base_url}", "llm.model=sim-gpt-4",
        f"llm.rpm={args.rpm}", f"llm.concurrency={args.concurrency}", f"llm.actors={args.actors}",
        "llm.max_tokens=64", "llm.cache=false", "progress=false",
    ])
    manifest = run_chat(config, log=lambda *_: None)
    return manifest["counts"]["written"], manifest["counts"]["dead_lettered"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64, help="in flight per actor (and for the plain script, in total x actors)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--latency", type=float, default=0.5)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    server = None
    base_url = args.base_url
    if not base_url:
        server, base_url = start_simulator("--latency", str(args.latency), "--rpm", str(args.rpm), port_base=18000)
    try:
        import ray

        ray.init(logging_level="ERROR", include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as tmp:
            reset_stats(base_url)
            before = cpu_seconds()
            ok, failed = ray_client(base_url, args, Path(tmp))
            print(json.dumps(summary("agentflan-ray", stats(base_url), ok, failed, args, cpu_seconds() - before)), flush=True)
        ray.shutdown()
        reset_stats(base_url)
        before = cpu_seconds()
        ok, failed = asyncio.run(plain_client(base_url, args.requests, args.concurrency * args.actors))
        print(json.dumps(summary("plain AsyncOpenAI+semaphore", stats(base_url), ok, failed, args, cpu_seconds() - before)))
    finally:
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
