"""The negatives job at scale against the simulator: rate, losses, deduplication.

    python bench/negatives_throughput.py --count 20000 --latency 0.5 --rpm 6000

The bundled real records and T-Eval tools are the material (so most queries are LLM-written, the
hard case for deduplication), the real `negatives` job runs on a local Ray (2 actors x 64 in flight,
``llm.rpm``) against `serve-sim` in its own process. Prints one JSON line: requests, answers per
second first to last answer over min(rpm / 60, actors * concurrency / latency) (``of_bound``; the
pause between the query pass and the answer pass counts against it; ``passes`` gives each pass's own
rate), 429 share, cases
written / dropped / dead-lettered and ``lost`` (cases not accounted for), deduplication figures,
wall time and cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO / "bench"))
from _simulator import rate_bound, rate_figures, start_simulator, stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--agent-h", type=int, default=1845)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--corrupt", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    server, base_url = start_simulator("--latency", str(args.latency), "--rpm", str(args.rpm), "--corrupt", str(args.corrupt), port_base=19500)
    try:
        import ray

        from agentflan_ray.config import load_config
        from agentflan_ray.jobs.negatives import NegativesConfig
        from agentflan_ray.jobs.negatives import run as run_negatives

        ray.init(logging_level="ERROR", include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(NegativesConfig, None, [
                f'inputs=[{{format: toolbench, path: "{FIXTURES}/toolbench/**/*.json"}}, '
                f'{{format: agentinstruct, path: "{FIXTURES}/agentinstruct/*.json"}}, '
                f'{{format: sharegpt, path: "{FIXTURES}/sharegpt/*.json"}}]',
                f'tool_catalogs=["{FIXTURES}/teval/api_descrip.json"]', f"output={tmp}/out", "progress=false",
                f"count={args.count}", f"agent_h_count={args.agent_h}", "positives=4", f"llm.base_url={base_url}",
                "llm.model=sim-gpt-4", f"llm.rpm={args.rpm}", f"llm.actors={args.actors}",
                f"llm.concurrency={args.concurrency}",
            ])
            started = time.monotonic()
            manifest = run_negatives(config, log=lambda *_: None)
            wall = time.monotonic() - started
        sim = stats(base_url)
        ray.shutdown()
    finally:
        server.terminate()
    times = sim["answer_times"] or [0.0]
    bound = rate_bound(args.rpm, args.actors, args.concurrency, args.latency)
    cases = manifest["counts"]["per_source"]["cases"]
    print(json.dumps({
        "count": args.count, "agent_h": args.agent_h, "requests": manifest["llm"]["requests"],
        **rate_figures(sim, bound),
        "written": cases["written"], "dropped": cases["quarantined"], "dead_lettered": cases["dead_lettered"],
        "lost": cases["read"] - cases["written"] - cases["quarantined"] - cases["dead_lettered"],
        "short": manifest["cases"].get("short", 0), "deduplication": manifest["cases"]["deduplication"],
        "passes": passes(times, bound), "agent_h_rows": manifest["agent_h"]["rows"], "wall_s": round(wall, 1),
        "cost_usd_at_sim_prices": manifest["llm"]["cost_usd"],
    }), flush=True)


def passes(times: list[float], bound: float, gap_s: float = 2.0) -> list[dict]:
    """The answer times cut where the simulator was idle for ``gap_s`` (between the query-writing and
    the answering pass: deduplication, a new actor pool): each pass's rate over the bound."""
    cuts = [0] + [i for i in range(1, len(times)) if times[i] - times[i - 1] > gap_s] + [len(times)]
    result = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        span = max(times[end - 1] - times[start], 1e-9)
        result.append({"answers": end - start, "per_s": round((end - start) / span, 1),
                       "of_bound": round((end - start) / span / bound, 3)})
    return result


if __name__ == "__main__":
    main()
