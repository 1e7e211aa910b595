"""`rewrite: llm` at scale: the generate job against the simulator, and its tokens beside a naive rewrite.

    python bench/rewrite_throughput.py --records 3000 --latency 0.5 --rpm 6000

The real ToolBench answer trees (give_answer only, so each yields a sample) are replicated with new
ids into JSONL shards, every one routed to a rewritten stream (tflan_cot / tflan_decomposed), and
the real `generate` job runs with ``rewrite=llm`` against ``serve-sim`` (a separate process) on a
local Ray with the machine's CPUs. Prints one JSON line:

- ``of_bound``: LLM-stage answers per second, first answer to last, over
  ``min(rpm / 60, actors * concurrency / latency)``; ``share_429``; ``lost`` (trajectories not
  accounted for as rewritten, partly rewritten or template);
- ``wall_s`` and ``wall_over_bound_s``: the whole job's wall time minus ``requests / bound``;
- ``tokens_per_trajectory`` (prompt + completion, re-asks included) and ``naive_tokens_per_trajectory``:
  what a hand-written rewrite costs, the whole rendered trajectory sent with a one-paragraph
  instruction and the whole trajectory written back (counted the same way, characters / 4), over
  the same output samples; ``of_naive`` is their ratio;
- ``dfsdt_turns_*``: assistant turns with DFSDT search talk in the same input rendered in template
  mode, in the fully rewritten samples, and in all of the LLM run's samples (fallback pieces keep
  their template text).
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
sys.path.insert(0, str(REPO / "bench"))
from _simulator import rate_bound, rate_figures, start_simulator, stats  # noqa: E402
from template_throughput import make_input  # noqa: E402

NAIVE_INSTRUCTION = ("Rewrite the following agent trajectory so that every assistant turn reads as natural "
                     "first-person prose. Keep every tool call, argument and observation exactly as it is. "
                     "Return the whole trajectory as JSON in the same structure.")


def naive_tokens(messages: list[dict]) -> int:
    from agentflan_ray.llm.simulator import estimate_tokens

    trajectory = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)
    sent = json.dumps([{"role": "system", "content": NAIVE_INSTRUCTION}, {"role": "user", "content": trajectory}],
                      sort_keys=True, ensure_ascii=False)
    return estimate_tokens(sent) + estimate_tokens(trajectory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--corrupt", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    server, base_url = start_simulator("--latency", str(args.latency), "--rpm", str(args.rpm), "--corrupt", str(args.corrupt), port_base=19000)
    try:
        import pyarrow.parquet as pq
        import ray

        from agentflan_ray.config import load_config
        from agentflan_ray.jobs.generate import GenerateConfig
        from agentflan_ray.jobs.generate import run as generate

        ray.init(logging_level="ERROR", include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "in"
            make_input(data, args.records, 1000, only_valid=True)
            config = load_config(GenerateConfig, None, [
                f'inputs=[{{format: toolbench, path: "{data}/*.jsonl"}}]', f"output={Path(tmp) / 'out'}",
                "rewrite=llm", f"llm.base_url={base_url}", "llm.model=sim-gpt-4", f"llm.rpm={args.rpm}",
                f"llm.actors={args.actors}", f"llm.concurrency={args.concurrency}", "progress=false",
                "toolbench_split={react: 0.0, tflan_cot: 0.4, tflan_decomposed: 0.6}", "instruct_share=0.0",
            ])
            started = time.monotonic()
            manifest = generate(config, log=lambda *_: None)
            wall = time.monotonic() - started
            samples = [row for stream in ("tflan_cot", "tflan_decomposed")
                       for row in pq.read_table(Path(tmp) / "out" / stream, columns=["messages", "meta"]).to_pylist()]
            config.rewrite, config.output = "template", str(Path(tmp) / "template")
            generate(config, log=lambda *_: None)
            template = [row for stream in ("tflan_cot", "tflan_decomposed")
                        for row in pq.read_table(Path(tmp) / "template" / stream, columns=["messages"]).to_pylist()]
        sim = stats(base_url)
        ray.shutdown()
    finally:
        server.terminate()
    rewrite = manifest["rewrite"]
    bound = rate_bound(args.rpm, args.actors, args.concurrency, args.latency)
    trajectories = rewrite["asked"]
    tokens = (rewrite["prompt_tokens"] + rewrite["completion_tokens"]) / max(trajectories, 1)
    naive = sum(naive_tokens(row["messages"]) for row in samples) / max(len(samples), 1)
    print(json.dumps({
        "records": args.records, "trajectories": trajectories, "requests": rewrite["requests"],
        "rewritten": rewrite["rewritten"], "partly_rewritten": rewrite["partly_rewritten"],
        "template": rewrite["template"],
        "lost": trajectories - rewrite["rewritten"] - rewrite["partly_rewritten"] - rewrite["template"],
        **rate_figures(sim, bound),
        "wall_s": round(wall, 1), "wall_over_bound_s": round(wall - rewrite["requests"] / bound, 1),
        "tokens_per_trajectory": round(tokens, 1), "naive_tokens_per_trajectory": round(naive, 1),
        "of_naive": round(tokens / naive, 3),
        "dfsdt_turns_template": dfsdt_turns(template),
        "dfsdt_turns_rewritten": dfsdt_turns([r for r in samples if json.loads(r["meta"])["status"] == "rewritten"]),
        "dfsdt_turns_all_llm_output": dfsdt_turns(samples),
    }), flush=True)


def dfsdt_turns(rows: list[dict]) -> int:
    """Assistant turns with DFSDT search talk ("previous action", "not the first time", ...)."""
    from agentflan_ray.aligning.prompts import DFSDT

    return sum(bool(DFSDT.search(m["content"])) for row in rows for m in row["messages"] if m["role"] == "assistant")


if __name__ == "__main__":
    main()
