"""Training-side figures: packing efficiency, and Ray Train's overhead over a bare DeepSpeed loop.

    python bench/train_throughput.py packing  [--samples 20000] [--seq-lens 2048 4096]
    python bench/train_throughput.py overhead [--steps 24] [--hidden 256] [--layers 4] [--seq-len 512]

Both start from the bundled real sample records: the demo `generate` job writes the samples, and
`make-tiny-model` trains the tokenizer (BPE, 2,000 tokens: it splits text finer than Llama's
32,000, so samples are longer in tokens than they would be for Llama-2).

packing: every sample is tokenized with the chat template; lengths are drawn with replacement
from that real distribution up to --samples and packed in batches of 512 (as TokenizeAndPack does).
Prints the share of real tokens for first-fit-decreasing packing (ours), for packing in arrival
order, for padding each micro-batch of 8 to its longest sample, and for padding every sample to
max_seq_len (Ray's DeepSpeed example).

overhead: the same packed rows, model, DeepSpeed config and micro-batch order, trained
(1) by `run_train` (Ray Train, 2 workers) and (2) by a bare `torchrun` + DeepSpeed loop (2
processes), one after the other on this machine. Tokens/s are counted from the end of the first
optimizer step to the end of the last, before the final checkpoint. Prints one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_samples(work: Path, vocab: int = 2000) -> tuple[Path, Path]:
    data, model = work / "data", work / "model"
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "agentflan_ray.cli", "generate", "--config",
                        str(REPO / "jobs/configs/demo.yaml"), f"output={data}", "progress=false"],
                       check=True, cwd=REPO, capture_output=True)
    if not (model / "config.json").exists():
        from agentflan_ray.training.tiny_model import make_tiny_model

        make_tiny_model(str(data), str(model), vocab_size=vocab)
    return data, model


def sample_lengths(data: Path, model: Path) -> list[int]:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from agentflan_ray.storage import StorageConfig
    from agentflan_ray.training.tokenize import SkipSample, tokenize_sample
    from agentflan_ray.writing.manifest import sample_shards

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for path in sample_shards(str(data), StorageConfig()):
        for messages in pq.read_table(path, columns=["messages"]).column("messages").to_pylist():
            try:
                lengths.append(len(tokenize_sample(messages, tokenizer, "chat_template", 10**9).input_ids))
            except SkipSample:
                continue
    return lengths


def packing(args) -> None:
    from agentflan_ray.training.packing import pack

    work = Path(args.work)
    lengths = sample_lengths(*demo_samples(work))
    rng = random.Random(0)
    for seq_len in args.seq_lens:
        original = [rng.choice(lengths) for _ in range(args.samples)]
        drawn = [min(n, seq_len) for n in original]  # overlong: truncate
        real = sum(drawn)
        rows = in_order = 0
        for start in range(0, len(drawn), 512):
            batch = drawn[start:start + 512]
            rows += sum(1 for _ in pack([([0] * n, [0] * n) for n in batch], seq_len, 0))
            in_order += rows_in_arrival_order(batch, seq_len)
        dynamic = sum(max(drawn[i:i + 8]) * len(drawn[i:i + 8]) for i in range(0, len(drawn), 8))
        print(json.dumps({
            "max_seq_len": seq_len, "samples": args.samples, "distinct_real_samples": len(lengths),
            "median_tokens": sorted(lengths)[len(lengths) // 2], "max_tokens": max(lengths),
            "truncated_share": round(sum(n > seq_len for n in original) / len(original), 4),
            "real_share_first_fit_decreasing": round(real / (rows * seq_len), 4),
            "real_share_arrival_order": round(real / (in_order * seq_len), 4),
            "real_share_padded_micro_batch_8": round(real / dynamic, 4),
            "real_share_padded_to_max_seq_len": round(real / (len(drawn) * seq_len), 4),
        }))


def rows_in_arrival_order(lengths: list[int], seq_len: int) -> int:
    rows, used = 0, seq_len
    for n in lengths:
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows


def overhead(args) -> None:
    import numpy as np
    import ray

    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.train import TrainConfig
    from agentflan_ray.jobs.train import run as run_train
    from agentflan_ray.training.data import prepare_dataset
    from agentflan_ray.training.tiny_model import make_tiny_model

    work = Path(args.work)
    data, _ = demo_samples(work)
    model = work / f"model-{args.hidden}x{args.layers}"
    if not (model / "config.json").exists():
        make_tiny_model(str(data), str(model), hidden=args.hidden, layers=args.layers)
    overrides = [f"data={data}", f"model={model}", f"max_seq_len={args.seq_len}", "num_workers=2",
                 "cpus_per_worker=1", "micro_batch=1", f"global_batch={args.global_batch}", f"max_steps={args.steps}",
                 f"checkpoint_every={args.steps}", "zero_stage=2", "lr=0.0003", f"storage_path={work / 'ckpt'}",
                 f"log_every={args.log_every}", *args.set]
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    config = load_config(TrainConfig, None, overrides)
    dataset, report = prepare_dataset(config)
    rows = work / "rows.npz"
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    np.savez(rows, **{k: np.concatenate([np.stack(list(b[k])) if b[k].dtype == object else b[k] for b in batches])
                      for k in ("input_ids", "labels", "position_ids", "real_tokens", "row")})
    started = time.monotonic()
    result = run_train(load_config(TrainConfig, None, [*overrides, f"run_name=ray-{int(time.time())}"]),
                       log=lambda *_: None)
    ray_figures = {"loop": "ray_train", "steps": result["metrics"]["step"],
                   "tokens_per_s": round(result["metrics"]["avg_tokens_per_s"], 1),
                   "wall_s_incl_startup": round(time.monotonic() - started, 1)}
    ray.shutdown()
    print(json.dumps(ray_figures), flush=True)
    if args.skip_bare:
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    bare = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           __file__, "bare-worker", "--rows", str(rows), "--overrides", json.dumps(overrides)],
                          env=env, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in bare.stdout.splitlines() if line.startswith("{")]
    if bare.returncode or not lines:
        raise SystemExit(bare.stdout[-3000:] + bare.stderr[-3000:])
    bare_figures = {**json.loads(lines[-1]), "wall_s_incl_startup": round(time.monotonic() - started, 1)}
    print(json.dumps(bare_figures))
    print(json.dumps({"ray_over_bare": round(ray_figures["tokens_per_s"] / bare_figures["tokens_per_s"], 4),
                      "rows": report["rows"], "padding_share": round(report["padding_share"], 4)}))


def bare_worker(args) -> None:
    """One torchrun process: the loop of agentflan_ray.training.loop without Ray (same engine code)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.train import TrainConfig
    from agentflan_ray.training.engine import (
        StepMeter,
        expected_row,
        setup_engine,
        to_device,
        train_micro_batch,
    )

    config = load_config(TrainConfig, None, json.loads(args.overrides))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    bundle = setup_engine(config, world, config.max_steps)
    rows = np.load(args.rows)
    micro_per_epoch = len(rows["row"]) // config.global_batch * bundle.accumulation
    meter, steady_tokens, steady_seconds, step, micro = StepMeter(bundle.device), 0.0, 0.0, 0, 0
    while step < config.max_steps:
        # The rows Ray Train's split gives this rank (blocks dealt round robin, see training/data.py).
        index = expected_row(micro % micro_per_epoch, config.micro_batch, config.block_rows, world, rank)
        batch = to_device({k: torch.as_tensor(rows[k][index:index + config.micro_batch])
                           for k in ("input_ids", "labels", "position_ids", "real_tokens")}, bundle.device)
        loss = train_micro_batch(bundle, batch)
        meter.add(loss, batch)
        micro += 1
        if micro % bundle.accumulation == 0:
            step += 1
            measured = meter.finish()
            if step > 1:
                steady_tokens += measured["tokens"]
                steady_seconds += measured["seconds"]
    if rank == 0:
        print(json.dumps({"loop": "bare_deepspeed", "steps": step, "tokens_per_s": round(steady_tokens / steady_seconds, 1)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "agentflan-bench-train"))
    commands = parser.add_subparsers(dest="command", required=True)
    pack_cmd = commands.add_parser("packing")
    pack_cmd.add_argument("--samples", type=int, default=20000)
    pack_cmd.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    over = commands.add_parser("overhead")
    over.add_argument("--steps", type=int, default=24)
    over.add_argument("--hidden", type=int, default=256)
    over.add_argument("--layers", type=int, default=4)
    over.add_argument("--seq-len", type=int, default=512)
    over.add_argument("--global-batch", type=int, default=8)
    over.add_argument("--log-every", type=int, default=1, help="steps between metric reports to Ray Train")
    over.add_argument("--skip-bare", action="store_true")
    over.add_argument("--set", nargs="*", default=[], help="more train config overrides, key=value")
    worker = commands.add_parser("bare-worker")
    worker.add_argument("--rows", required=True)
    worker.add_argument("--overrides", required=True)
    args = parser.parse_args()
    {"packing": packing, "overhead": overhead, "bare-worker": bare_worker}[args.command](args)


if __name__ == "__main__":
    main()
