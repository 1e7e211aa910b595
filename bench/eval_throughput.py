"""The eval job's Hugging Face backend on CPU: cases per second batched vs one case at a time.

    python bench/eval_throughput.py --cases 64 --batch-size 8 --max-new-tokens 32

A tiny Llama-style model (``make_tiny_model`` over the bundled records: 2 layers, hidden 64) and the
bundled Agent-H set (`jobs/configs/eval_demo_agent_h.jsonl`, repeated to ``--cases``), the real `eval`
job on a local Ray with one actor, run twice: ``batch_size=1`` and ``--batch-size``. Prints one JSON
line with cases per second of each (first case to the end of the job, model loading included) and
their ratio.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_tiny_data

    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.eval import EvalConfig
    from agentflan_ray.jobs.eval import run as run_eval

    ray.init(logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [json.loads(line) for line in (REPO / "jobs/configs/eval_demo_agent_h.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_data(Path(tmp) / "tiny")
        sets = Path(tmp) / "set.jsonl"
        with open(sets, "w") as f:
            for i in range(args.cases):
                f.write(json.dumps({**rows[i % len(rows)], "id": f"case-{i}"}) + "\n")
        result = {"cases": args.cases, "max_new_tokens": args.max_new_tokens}
        for batch in (1, args.batch_size):
            config = load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={tmp}/out-{batch}",
                                                    f"model={root / 'model'}", f"batch_size={batch}",
                                                    f"max_new_tokens={args.max_new_tokens}", "progress=false"])
            started = time.monotonic()
            manifest = run_eval(config, log=lambda *_: None)
            seconds = time.monotonic() - started
            assert manifest["counts"]["written"] == args.cases
            result[f"batch_{batch}_cases_per_s"] = round(args.cases / seconds, 2)
        result["speedup"] = round(result[f"batch_{args.batch_size}_cases_per_s"] / result["batch_1_cases_per_s"], 2)
    ray.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
