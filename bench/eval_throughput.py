"""The eval job's Hugging Face backend on CPU: cases per second batched vs one case at a time.

    python bench/eval_throughput.py --cases 64 --batch-size 8 --max-new-tokens 32

A tiny Llama-style model (2 layers, hidden 64, random weights) and the bundled Agent-H set
(`jobs/configs/eval_demo_agent_h.jsonl`, cycled to ``--cases``, each case's number appended to its
last turn: copies share their system prompt and tools, as a real set's cases do, but not their
whole prompt).

Tokenizer: ``--tokenizer records`` (the default) is ``make_tiny_model`` with its defaults over the
demo `generate` job's output, a 2,000-token BPE trained on the bundled real records: 3.2 characters
a token on these prompts (Llama-2's tokenizer: about 3.5-4 on such text). ``--tokenizer fixture`` is
the tests' model, whose 300-token BPE is trained on one short conversation and so spells these
prompts out nearly byte by byte (1.1 characters a token, prompts three times as long).

Measured two ways, each with ``batch_size=1`` and ``--batch-size``:

    job        the real `eval` job on a local Ray with one actor (one CPU, so one torch thread):
               start to end of the job, the actor's start and model loading included; and
               ``after_first``: from the first replies to reach the driver to the last (the
               manifest's ``cases_per_s_after_first``), the rate once started
    generate   ``HFGenerate`` alone in this process on one thread, the cases in the job's order and
               batches: the time inside ``__call__`` only; the two modes alternate ``--repeat``
               times and each keeps its fastest pass (the machine may be shared)

The tiny model's weights are random and (in practice) never emit the end marker, so every case
generates exactly ``--max-new-tokens`` tokens in both modes; ``ended_early`` counts the cases that
stopped sooner (0 in every run so far). Prints one JSON line with cases per second of each, their
ratios, and how many replies the two modes share (greedy: all of them, unless float rounding breaks
a near tie).

Endpoint backend against the simulator (``--endpoint``):

    python bench/eval_throughput.py --endpoint --cases 3000 --latency 0.5 --rpm 6000

The three bundled sets (Agent-H, tool_call, instruct) cycled to ``--cases`` cases, each prompt made
unique (no cache hit), and the real `eval` job with ``native_tools=auto`` (general cases get tools=,
the simulator answers about half of them with native calls) against ``serve-sim`` (its own process)
on a local Ray with the machine's CPUs. The preflight runs first, then the simulator's counts are
reset. Prints one JSON line: ``of_bound``, answers per second from the first answer to the last over
``min(rpm / 60, actors * concurrency / latency)``; ``share_429``; ``lost`` (cases neither scored nor
dead-lettered); ``wall_s`` and ``wall_over_bound_s`` (the job's wall time minus ``cases / bound``).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="passes of the generate measure per mode")
    parser.add_argument("--tokenizer", choices=("records", "fixture"), default="records")
    args = parser.parse_args()
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    from conftest import write_tiny_data
    from train_throughput import demo_samples

    ray.init(logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [json.loads(line) for line in (REPO / "jobs/configs/eval_demo_agent_h.jsonl").read_text().splitlines()]
    batches = (1, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer == "fixture":
            model = write_tiny_data(Path(tmp) / "tiny") / "model"
        else:
            model = demo_samples(Path(tmp) / "demo")[1]
        cases = [own_last_turn({**rows[i % len(rows)], "id": f"case-{i}"}, i) for i in range(args.cases)]
        result = {"cases": args.cases, "max_new_tokens": args.max_new_tokens, "tokenizer": args.tokenizer,
                  **prompt_tokens(model, cases)}
        replies = {}
        for batch in batches:
            seconds, manifest, written = run_job(Path(tmp), cases, model, batch, args.max_new_tokens)
            replies[batch] = {row["id"]: row["reply"] for row in written}
            result[f"batch_{batch}_cases_per_s"] = round(args.cases / seconds, 2)
            result[f"batch_{batch}_first_replies_s"] = manifest["llm"]["first_replies_s"]
            result[f"batch_{batch}_after_first_cases_per_s"] = manifest["llm"]["cases_per_s_after_first"]
            result[f"ended_early_batch_{batch}"] = sum(row["finish_reason"] == "stop" for row in written)
        ray.shutdown()
        result["speedup"] = ratio(result, "batch_{}_cases_per_s", batches)
        result["speedup_after_first"] = ratio(result, "batch_{}_after_first_cases_per_s", batches)
        result["same_replies"] = sum(replies[1][key] == replies[args.batch_size][key] for key in replies[1])
        for batch, seconds in generate_seconds(model, cases, batches, args.max_new_tokens, args.repeat).items():
            result[f"generate_batch_{batch}_cases_per_s"] = round(args.cases / seconds, 2)
        result["generate_speedup"] = ratio(result, "generate_batch_{}_cases_per_s", batches)
    print(json.dumps(result), flush=True)


def run_job(tmp: Path, cases: list[dict], model: Path, batch: int, max_new_tokens: int) -> tuple:
    """Seconds of the `eval` job over these cases, its manifest and its per-case rows."""
    import pyarrow.parquet as pq

    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.eval import EvalConfig
    from agentflan_ray.jobs.eval import run as run_eval

    sets = tmp / "set.jsonl"
    sets.write_text("".join(json.dumps(case) + "\n" for case in cases))
    config = load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={tmp}/out-{batch}", f"model={model}",
                                            f"batch_size={batch}", f"max_new_tokens={max_new_tokens}",
                                            "progress=false"])
    started = time.monotonic()
    manifest = run_eval(config, log=lambda *_: None)
    seconds = time.monotonic() - started
    assert manifest["counts"]["written"] == len(cases)
    return seconds, manifest, pq.read_table(f"{tmp}/out-{batch}/cases", columns=["id", "reply", "finish_reason"]).to_pylist()


def generate_seconds(model: Path, cases: list[dict], batches: tuple, max_new_tokens: int,
                     repeat: int) -> dict[int, float]:
    """Seconds inside ``HFGenerate.__call__`` for the cases, in the job's order, per batch size: the
    fastest of ``repeat`` passes, the batch sizes taking turns."""
    import pyarrow as pa
    import torch

    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA, HFGenerate, batch_order
    from agentflan_ray.jobs.eval import case_rows
    from agentflan_ray.storage import StorageConfig

    torch.set_num_threads(1)  # as in the job's actor (num_cpus=1)
    generate = HFGenerate(str(model), StorageConfig(), max_new_tokens)
    rows = sorted(case_rows(cases), key=batch_order)
    seconds = {batch: float("inf") for batch in batches}
    for _ in range(repeat):
        for batch in batches:
            tables = [pa.Table.from_pylist(rows[i:i + batch], schema=CASE_ROW_SCHEMA) for i in range(0, len(rows), batch)]
            started = time.perf_counter()
            for table in tables:
                generate(table)
            seconds[batch] = min(seconds[batch], time.perf_counter() - started)
    return seconds


def own_last_turn(case: dict, number: int) -> dict:
    """The case with its number at the end of its last turn: cycled copies of a case share their
    system prompt and tools, as cases of a real set do, but not their whole prompt."""
    *head, last = case["messages"]
    return {**case, "messages": [*head, {**last, "content": f"{last['content']}\n(case {number})"}]}


def prompt_tokens(model: Path, cases: list[dict]) -> dict:
    """The cases' prompts (the chat template) in the model's tokens: mean and longest, and the mean
    characters a token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
               for case in cases]
    lengths = [len(tokenizer(prompt, add_special_tokens=False).input_ids) for prompt in prompts]
    return {"prompt_tokens_mean": round(sum(lengths) / len(lengths)), "prompt_tokens_max": max(lengths),
            "chars_per_token": round(sum(map(len, prompts)) / sum(lengths), 2)}


def ratio(result: dict, key: str, batches: tuple) -> float:
    return round(result[key.format(batches[1])] / result[key.format(batches[0])], 2)


def endpoint_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="the eval job's endpoint backend against the simulator")
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.path.insert(0, str(REPO / "bench"))
    from _simulator import rate_bound, rate_figures, reset_stats, start_simulator, stats

    server, base_url = start_simulator("--latency", str(args.latency), "--rpm", str(args.rpm), port_base=19400)
    try:
        import ray

        from agentflan_ray.config import load_config
        from agentflan_ray.jobs.eval import EvalConfig, preflight
        from agentflan_ray.jobs.eval import run as run_eval

        ray.init(logging_level="ERROR", include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as tmp:
            sets = unique_cases(Path(tmp) / "set.jsonl", args.cases)
            config = load_config(EvalConfig, None, [
                f"sets=[{sets}]", f"output={Path(tmp) / 'out'}", f"endpoint={base_url}", "model_name=sim-gpt-4",
                f"llm.rpm={args.rpm}", f"llm.actors={args.actors}", f"llm.concurrency={args.concurrency}",
                "progress=false"])
            prepared = preflight(config)
            reset_stats(base_url)
            started = time.monotonic()
            manifest = run_eval(config, log=lambda *_: None, prepared=prepared)
            wall = time.monotonic() - started
        sim = stats(base_url)
        ray.shutdown()
    finally:
        server.terminate()
    counts = manifest["counts"]
    bound = rate_bound(args.rpm, args.actors, args.concurrency, args.latency)
    print(json.dumps({
        "cases": args.cases, "written": counts.get("written", 0), "dead_lettered": counts.get("dead_lettered", 0),
        "lost": args.cases - counts.get("written", 0) - counts.get("dead_lettered", 0),
        "native_tools": config.native_tools, "asked_natively": manifest["native_tools"]["asked"],
        **rate_figures(sim, bound),
        "wall_s": round(wall, 1), "wall_over_bound_s": round(wall - args.cases / bound, 1),
    }), flush=True)


def unique_cases(path: Path, count: int) -> Path:
    """The bundled sets cycled to ``count`` cases, each with its own id and its own last turn."""
    rows = [json.loads(line) for name in ("agent_h", "tool_call", "instruct")
            for line in (REPO / f"jobs/configs/eval_demo_{name}.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps(own_last_turn({**rows[i % len(rows)], "id": f"case-{i}"}, i)) + "\n")
    return path


if __name__ == "__main__":
    if "--endpoint" in sys.argv[1:]:
        endpoint_main([arg for arg in sys.argv[1:] if arg != "--endpoint"])
    else:
        main()
