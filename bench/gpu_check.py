"""The GPU training path and the eval HF backend, checked and measured in one command (see bench/gpu_check.sh).

    python bench/gpu_check.py prepare                 # here, on CPU: the inputs it carries (bench/_gpu)
    bash bench/gpu_check.sh [--out DIR]               # on the GPU machine: every part below, < 9 min
    bash bench/gpu_check.sh --dry-run                 # the same steps on CPU with a tiny model (CI)

Parts, each printing one JSON line per figure (``{"part": ..., ...}``):

  correctness   a small Llama in bf16 on the GPU: the FlexAttention block mask equals the exact mask
                element by element; FlexAttention logits match the exact-mask (sdpa) logits; the loss
                of a packed row equals the token-weighted loss of its samples run one by one, through
                the exact path, FlexAttention, and Liger's fused kernels (tolerances below).
  throughput    a ~1B Llama-3.2-1B-shaped model built from its config (random weights), rows packed
                to 4096 tokens from the bundled real samples, ZeRO-2, bf16, PyTorch's fused AdamW,
                micro-batch chosen to fill the GPU: tokens/s, MFU, peak memory, without and with the
                fused kernels; a profile of the faster run (top kernels, time by kind, data wait,
                optimizer step).
  ray           the same model, rows and settings through `run_train` (Ray Train, 1 worker): tokens/s
                and its ratio to the bare loop.
  eval          the eval job's Hugging Face backend (``HFGenerate``, greedy, bf16) on the same ~1B
                model over the bundled Agent-H cases (each with its own last turn): cases/s one at a
                time and in batches of 8 and 32, their ratio to one at a time, peak memory, and how
                many replies a batch gives exactly as one at a time (bf16 kernels differ by shape,
                so a near tie may break either way). No Ray needed.

MFU, written out (PaLM accounting, metrics.flops_per_token): every real (non-padding) token costs
``6 N + 12 L H S`` FLOPs, N the parameters a token passes through (all but the input embedding, LM
head included), L layers, H hidden size, S = max_seq_len; MFU = tokens/s x that / peak bf16 FLOP/s
of the GPU (989e12 for H100/H200 SXM, dense). ``mfu_sample_attention`` counts attention over each
sample's own length instead (12 L H sum(n_i^2) per row), the work the block mask actually leaves.

Tolerances: bf16 results within 1e-2 relative of each other (bf16 keeps 8 bits of mantissa;
summation order differs between kernels); fp32 exact path packed vs unpacked within 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_INPUTS = REPO / "bench" / "_gpu"  # samples + tokenizer made by `prepare`, carried to the GPU machine

# Llama-3.2-1B's shape (1.24e9 parameters, tied embeddings), random weights.
ONE_B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "rope_theta": 500000.0,
         "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
SMALL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 8192}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}
BF16_RTOL, FP32_RTOL = 1e-2, 1e-5


def emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


# ----------------------------------------------------------------------------- inputs


def prepare(args) -> None:
    """Here, on CPU: the demo generate output's sample shards and a BPE tokenizer trained on them."""
    from agentflan_ray.training.tiny_model import sample_texts, train_tokenizer

    out = Path(args.inputs)
    demo = Path(args.demo)
    if not (demo / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "agentflan_ray.cli", "generate", "--config",
                        str(REPO / "jobs/configs/demo.yaml"), f"output={demo}", "progress=false"],
                       check=True, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(demo, out / "samples", ignore=shutil.ignore_patterns("quarantine"))  # shards + manifest
    train_tokenizer(sample_texts(str(demo)), 2000).save_pretrained(out / "tokenizer")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


def replicate_samples(source: Path, dest: Path, copies: int) -> int:
    """The carried samples ``copies`` times over with new ids, as a finished generate output."""
    import pyarrow.parquet as pq

    from agentflan_ray.storage import StorageConfig
    from agentflan_ray.writing.manifest import sample_shards, write_output
    from agentflan_ray.writing.shards import sample_schema

    streams: dict[str, list[dict]] = {}
    for path in sample_shards(str(source), StorageConfig()):
        rows = pq.read_table(path).to_pylist()
        streams.setdefault(Path(path).parent.name, []).extend(
            {**row, "id": f"{row['id']}#{copy}"} for copy in range(copies) for row in rows)
    shutil.rmtree(dest, ignore_errors=True)
    return write_output(str(dest), StorageConfig(), "generate", streams, sample_schema)["counts"]["written"]


def make_model(tokenizer_dir: Path, dest: Path, shape: dict, device: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (dest / "config.json").exists():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tokenizer), **shape}  # the 1B keeps Llama-3's 128,256 (rows unused here)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def pack_locally(config) -> dict:
    """The rows prepare_dataset makes (same shuffle key, same packing groups), without Ray."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agentflan_ray.training.data import PACK_GROUP, TokenizeAndPack, shuffle_key
    from agentflan_ray.writing.manifest import sample_shards

    table = pa.concat_tables([pq.read_table(p, columns=["id", "messages"])
                              for p in sample_shards(config.data, config.storage)])
    keyed = shuffle_key(table, config.seed, max(1, round(table.num_rows / PACK_GROUP))).to_pydict()
    packer = TokenizeAndPack(config.model, config.template, config.max_seq_len, config.overlong)
    columns: dict[str, list] = {k: [] for k in ("input_ids", "labels", "position_ids", "real_tokens")}
    for group in sorted(set(keyed["_group"])):
        members = [i for i, g in enumerate(keyed["_group"]) if g == group]
        out = packer({"messages": [keyed["messages"][i] for i in members],
                      "_order": np.array([keyed["_order"][i] for i in members])})
        keep = out["real_tokens"] > 0
        for key in columns:
            columns[key] += list(out[key][keep])
    return {k: np.stack(v).astype(np.int64) if k != "real_tokens" else np.array(v, dtype=np.int64)
            for k, v in columns.items()}


def sample_lengths(position_ids, real_tokens) -> list[list[int]]:
    """Per row, the lengths of its samples (padding excluded), from the position ids."""
    rows = []
    for positions, real in zip(position_ids, real_tokens, strict=True):
        starts = [i for i, p in enumerate(positions[:real]) if p == 0] + [int(real)]
        rows.append([b - a for a, b in zip(starts, starts[1:], strict=False)])
    return rows


# ----------------------------------------------------------------------------- correctness


def correctness(args) -> None:
    import torch
    from torch.nn.attention.flex_attention import create_mask
    from transformers import AutoModelForCausalLM

    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.train import TrainConfig
    from agentflan_ray.training.attention import attention_inputs, block_causal_mask, document_mask_mod
    from agentflan_ray.training.engine import liger_installed, select_fused_kernels

    work, device = Path(args.work), args.device
    shape = "tiny" if args.dry_run else "small"
    model_dir = make_model(Path(args.inputs) / "tokenizer", work / f"model-{shape}", TINY if args.dry_run else SMALL, "cpu")
    seq = args.seq_len
    config = load_config(TrainConfig, None, [f"data={work / 'samples'}", f"model={model_dir}", f"max_seq_len={seq}"])
    rows = pack_locally(config)
    # The two rows holding the most samples (first-fit decreasing puts long samples alone first).
    counts = [len(s) for s in sample_lengths(rows["position_ids"], rows["real_tokens"])]
    chosen = sorted(range(len(counts)), key=lambda i: -counts[i])[:2]
    rows = {k: v[chosen] for k, v in rows.items()}
    take = len(chosen)
    positions = torch.as_tensor(rows["position_ids"][:take], device=device)

    # 1. The block mask's predicate is the exact mask, element by element, on real packed rows.
    dense = create_mask(document_mask_mod(positions), take, 1, seq, seq, device=device)
    exact = block_causal_mask(positions) == 0
    emit({"part": "correctness", "check": "block_mask_equals_exact_mask", "rows": take, "seq_len": seq,
          "samples_per_row": [len(s) for s in sample_lengths(rows["position_ids"][:take], rows["real_tokens"][:take])],
          "pass": bool(torch.equal(dense, exact))})

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rtol = BF16_RTOL if dtype == torch.bfloat16 else FP32_RTOL
    batch = {k: torch.as_tensor(rows[k][:take], device=device) for k in ("input_ids", "labels", "position_ids")}
    lengths = sample_lengths(rows["position_ids"][:take], rows["real_tokens"][:take])

    def load(attention: str, fused: bool, model_dtype=dtype):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model_dtype, attn_implementation=attention)
        model.config.use_cache = False
        options = select_fused_kernels("liger" if fused else "none", device == "cuda", 2, model.config.model_type)
        if options:
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model, **options)
        return model.to(device).train()

    def packed_loss(model, attention: str):
        kwargs = attention_inputs(batch["position_ids"], attention, model.dtype)
        return model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss

    def unpacked_loss(model):
        """Each sample alone (plain causal attention), weighted by its trained tokens."""
        total = weight = 0.0
        for r, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                ids = batch["input_ids"][r:r + 1, start:start + n]
                labels = batch["labels"][r:r + 1, start:start + n].clone()
                labels[:, 0] = -100  # packing never trains a sample's first token (packing.py)
                trained = int((labels[:, 1:] != -100).sum())
                if trained:
                    loss = model(input_ids=ids, labels=labels, position_ids=torch.arange(n, device=device)[None]).loss
                    total, weight = total + loss.float() * trained, weight + trained
                start += n
        return total / weight

    def relative(a, b) -> float:
        a, b = (float(x.detach()) if hasattr(x, "detach") else float(x) for x in (a, b))
        return abs(a - b) / max(abs(b), 1e-12)

    # 2. Exact path in fp32: the reference every other path is held to.
    fp32 = load("sdpa", False, torch.float32)
    with torch.no_grad():
        reference_packed, reference = packed_loss(fp32, "sdpa"), unpacked_loss(fp32)
    emit({"part": "correctness", "check": "packed_equals_unpacked", "path": "exact_mask_fp32",
          "packed": float(reference_packed), "unpacked": float(reference),
          "rel_diff": relative(reference_packed, reference), "tolerance": FP32_RTOL,
          "pass": relative(reference_packed, reference) <= FP32_RTOL})
    del fp32

    # 3. Each path's packed loss (with its backward, as training runs it) against the samples run one
    # by one through the exact path in the same dtype; FlexAttention's logits and gradients against
    # the exact mask's (same weights, same dtype).
    exact = load("sdpa", False)
    with torch.no_grad():
        separate = unpacked_loss(exact)
    del exact
    if args.dry_run:  # FlexAttention has no backward on CPU; its forward runs uncompiled there
        import torch.nn.attention.flex_attention as flex

        torch._dynamo.config.disable = flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    paths = [("sdpa", False), ("flex_attention", False)]
    if device == "cuda" and liger_installed():
        paths.append(("flex_attention", True))
    logits, grads = {}, {}
    for attention, fused in paths:
        model = load(attention, fused)
        name = attention + ("+liger" if fused else "")
        backward = not (args.dry_run and attention == "flex_attention")
        if not fused:
            with torch.no_grad():
                kwargs = attention_inputs(batch["position_ids"], attention, model.dtype)
                logits[attention] = model(input_ids=batch["input_ids"], **kwargs).logits.float()
        with torch.set_grad_enabled(backward):
            packed = packed_loss(model, attention)
        if backward:
            packed.backward()
            grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        emit({"part": "correctness", "check": "packed_equals_unpacked", "path": name, "dtype": str(dtype),
              "packed": float(packed.detach()), "unpacked": float(separate), "rel_diff": relative(packed, separate),
              "rel_diff_to_fp32_reference": relative(packed, reference), "tolerance": rtol, "backward": backward,
              "pass": relative(packed, separate) <= rtol and relative(packed, reference) <= max(rtol, 1e-4)})
        del model
    if args.dry_run:
        torch._dynamo.config.disable = flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = False
    trained = batch["labels"] != -100
    diff = (logits["flex_attention"] - logits["sdpa"]).abs()[trained]
    scale = logits["sdpa"].abs()[trained].mean()
    emit({"part": "correctness", "check": "flex_attention_logits_equal_exact_mask", "dtype": str(dtype),
          "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "mean_abs_logit": float(scale),
          "tolerance": f"mean_abs_diff <= {rtol} x mean_abs_logit", "pass": float(diff.mean()) <= rtol * float(scale)})
    if "flex_attention" in grads:
        a, b = grads["flex_attention"], grads["sdpa"]
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        norm = relative(a.norm(), b.norm())
        emit({"part": "correctness", "check": "flex_attention_gradients_equal_exact_mask", "dtype": str(dtype),
              "cosine": cosine, "rel_norm_diff": norm, "tolerance": f"cosine >= 0.999, norm within {rtol}",
              "pass": cosine >= 0.999 and norm <= rtol})


# ----------------------------------------------------------------------------- throughput (bare)


def train_config(args, model_dir: Path, micro: int, fused: str, extra: list[str] = ()):
    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.train import TrainConfig

    work = Path(args.work)
    return load_config(TrainConfig, None, [
        f"data={work / 'samples'}", f"model={model_dir}", f"max_seq_len={args.seq_len}", "num_workers=1",
        f"use_gpu={str(args.device == 'cuda').lower()}", "zero_stage=2", f"micro_batch={micro}",
        f"global_batch={micro * args.accumulation}", f"max_steps={args.steps}", f"fused_kernels={fused}",
        "lr=1e-5", "warmup_ratio=0.1", f"storage_path={work / 'checkpoints'}", *extra])


def probe_micro_batch(config, row: dict, capacity: int) -> dict:
    """Micro-batch that fills the GPU: one packed row forward + backward (exact mask, no optimizer)
    gives the memory a row needs; ZeRO-2 on one GPU keeps ~20 bytes per parameter besides
    (bf16 weights and gradients, fp32 master weights, gradients and two Adam moments)."""
    import torch

    from agentflan_ray.training.attention import attention_inputs
    from agentflan_ray.training.engine import load_model

    model, _ = load_model(config, "sdpa")
    model = model.cuda()
    params = sum(p.numel() for p in model.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    batch = {k: torch.as_tensor(v[None]).cuda() for k, v in row.items()}
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"],
                 **attention_inputs(batch["position_ids"], "sdpa", model.dtype)).loss
    loss.backward()
    torch.cuda.synchronize()
    per_row = max(torch.cuda.max_memory_allocated() - before - 2 * params, 1 << 20)  # minus the bf16 gradients
    del model, loss, batch
    torch.cuda.empty_cache()
    static = 20 * params + (2 << 30)  # + DeepSpeed's reduce buckets and the allocator's slack
    # Margins from the H200 run: 11 rows estimated at 9.3 GB each ran out of memory, 7 peaked at 10.3
    # GB a row over the static part.
    micro = max(1, min(64, int((0.85 * capacity - static) // (1.15 * per_row))))
    return {"micro_batch": micro, "row_bytes": per_row, "static_bytes_estimate": static, "parameters": params}


def bare(args) -> None:
    """One process, no Ray: engine.setup_engine + engine.train_micro_batch over the packed rows."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from agentflan_ray.training.engine import StepMeter, setup_engine, to_device, train_micro_batch
    from agentflan_ray.training.metrics import flops_per_token, peak_flops

    work, cuda = Path(args.work), args.device == "cuda"
    model_dir = Path(args.model)
    rows_file = work / f"rows-{args.seq_len}.npz"
    config = train_config(args, model_dir, max(args.micro, 1), args.fused)
    if not rows_file.exists():
        np.savez(rows_file, **pack_locally(config))
    rows = dict(np.load(rows_file))
    probe = {}
    if args.micro == 0:
        probe = probe_micro_batch(config, {k: rows[k][0] for k in ("input_ids", "labels", "position_ids")},
                                  torch.cuda.get_device_properties(0).total_memory)
        config = train_config(args, model_dir, probe["micro_batch"], args.fused)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    bundle = setup_engine(config, 1, config.max_steps)
    count, micro_batch = len(rows["real_tokens"]), config.micro_batch
    flops = flops_per_token(bundle.model_config, config.max_seq_len)
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else 0.0
    model = bundle.model_config
    lengths = sample_lengths(rows["position_ids"], rows["real_tokens"])
    squares = np.array([sum(n * n for n in row) for row in lengths], dtype=np.float64)
    meter = StepMeter(bundle.device)
    steady = {"tokens": 0.0, "seconds": 0.0, "attention_flops": 0.0, "steps": 0}
    step = micro = 0
    try:
        while step < config.max_steps:
            index = [(micro * micro_batch + i) % count for i in range(micro_batch)]
            batch = {k: torch.as_tensor(rows[k][index]) for k in ("input_ids", "labels", "position_ids", "real_tokens")}
            if cuda:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            batch = to_device(batch, bundle.device)
            loss = train_micro_batch(bundle, batch)
            meter.add(loss, batch)
            micro += 1
            if micro % bundle.accumulation:
                continue
            step += 1
            measured = meter.finish()
            if step > 1:  # the first step compiles kernels; Ray Train's average skips it too
                steady["tokens"] += measured["tokens"]
                steady["seconds"] += measured["seconds"]
                steady["steps"] += 1
                first = (micro - bundle.accumulation) * micro_batch
                steady["attention_flops"] += 12 * model.num_hidden_layers * model.hidden_size * sum(
                    squares[(first + i) % count] for i in range(bundle.accumulation * micro_batch))
            last_loss = measured["loss"]
    except torch.OutOfMemoryError:
        emit({"part": "throughput", "fused_kernels": args.fused, "error": "out_of_memory",
              "micro_batch": micro_batch, **probe})
        sys.exit(3)
    tokens_per_s = steady["tokens"] / steady["seconds"]
    non_attention = flops - 12 * model.num_hidden_layers * model.hidden_size * config.max_seq_len
    record = {
        "part": "throughput", "loop": "bare_deepspeed", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": {k: getattr(model, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size")},
        "parameters": sum(p.numel() for p in bundle.engine.module.parameters()) or probe.get("parameters"),
        "attention": bundle.attention, "fused_kernels": args.fused if bundle.fused_kernels else "none",
        "rows": count, "real_tokens_total": int(rows["real_tokens"].sum()),
        "seq_len": config.max_seq_len, "micro_batch": micro_batch, "accumulation": bundle.accumulation,
        "global_batch": config.global_batch, "timed_steps": steady["steps"], "loss_last": round(last_loss, 4),
        "step_s": round(steady["seconds"] / steady["steps"], 4), "tokens_per_s": round(tokens_per_s, 1),
        "padding_share": round(1 - steady["tokens"] / (steady["steps"] * config.global_batch * config.max_seq_len), 4),
        "flops_per_token": flops,
    }
    if peak:
        record["mfu"] = round(flops * tokens_per_s / peak, 4)
        record["mfu_sample_attention"] = round(
            (non_attention * steady["tokens"] + steady["attention_flops"]) / steady["seconds"] / peak, 4)
        record["mfu_formula"] = (f"(6N + 12*L*H*S) * tokens_per_s / peak = {flops:.4g} * {tokens_per_s:.1f} / "
                                 f"{peak:.4g}")
    if cuda:
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        record["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    if probe:
        record["probe"] = {k: v for k, v in probe.items() if k != "micro_batch"}
    emit(record)
    if args.profile:
        profile(bundle, rows, micro, micro_batch, count, args)
    dist.destroy_process_group()


def profile(bundle, rows: dict, micro: int, micro_batch: int, count: int, args) -> None:
    """Where the time of ``args.profile`` optimizer steps goes: kernels by kind, the top kernels,
    the optimizer step, and how busy the GPU was."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from agentflan_ray.training.engine import to_device, train_micro_batch

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(args.profile * bundle.accumulation):
            index = [(micro * micro_batch + i) % count for i in range(micro_batch)]
            batch = {k: torch.as_tensor(rows[k][index]) for k in ("input_ids", "labels", "position_ids")}
            train_micro_batch(bundle, to_device(batch, bundle.device))
            micro += 1
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    kernels, kinds = [], {}
    for event in prof.key_averages():
        device_time = event.self_device_time_total  # microseconds; kernels only (CPU ops would count twice)
        if device_time <= 0 or event.device_type != DeviceType.CUDA:
            continue
        kernels.append((event.key, device_time / 1e3, event.count))
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + device_time / 1e3
    busy = sum(ms for _, ms, _ in kernels)
    kernels.sort(key=lambda k: -k[1])
    optimizer_ms = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("Optimizer.step")) / 1e3
    emit({"part": "profile", "steps": args.profile, "wall_ms": round(wall * 1e3, 1),
          "gpu_busy_share": round(busy / (wall * 1e3), 4) if busy else None,
          "by_kind_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
          "by_kind_share": {k: round(v / busy, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])} if busy else {},
          "optimizer_step_cpu_ms": round(optimizer_ms, 1),
          "top_kernels": [{"name": name[:120], "ms": round(ms, 2), "calls": calls,
                           "share": round(ms / busy, 4) if busy else None} for name, ms, calls in kernels[:15]]})


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, marks in (("attention", ("flex", "attention", "fmha", "triton_tem")),
                        ("optimizer", ("adam", "multi_tensor")),
                        ("fused_kernels", ("liger", "rms_norm", "swiglu", "rope", "cross_entropy", "element_mul")),
                        ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "matmul")),
                        ("communication", ("nccl", "allreduce", "reduce_scatter")),
                        ("copy", ("copy", "memcpy", "memset", "fill", "cat")),
                        ("compiled", ("triton_",))):
        if any(mark in lowered for mark in marks):
            return kind
    return "other"


# ----------------------------------------------------------------------------- Ray Train


def through_ray(args) -> None:
    import ray

    from agentflan_ray.jobs.train import run as run_train

    cuda = args.device == "cuda"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = train_config(args, Path(args.model), args.micro, args.fused, [
        f"cpus_per_worker={4 if cuda else 1}", f"checkpoint_every={10**6}", "checkpoint_at_end=false",
        f"run_name=gpu-check-{int(time.time())}", "report_interval_s=10"])
    started = time.monotonic()
    result = run_train(config, log=lambda *_: None)
    metrics = result["metrics"]
    emit({"part": "ray", "loop": "ray_train", "workers": 1, "micro_batch": config.micro_batch,
          "fused_kernels": metrics.get("fused_kernels"), "attention": metrics.get("attention"),
          "steps": metrics.get("step"), "tokens_per_s": round(metrics.get("avg_tokens_per_s", 0.0), 1),
          "mfu_last_step": metrics.get("mfu"), "data_wait_share_last_step": metrics.get("data_wait_share"),
          "peak_memory_gib": metrics.get("peak_memory_gib"),
          "rows": result["data"]["rows"], "real_tokens_total": result["data"]["tokens"] - result["data"]["padding"],
          "padding_share": round(result["data"]["padding_share"], 4),
          "rows_out_of_order": metrics.get("rows_out_of_order"),
          "wall_s_incl_startup": round(time.monotonic() - started, 1)})
    ray.shutdown()


def eval_generate(args) -> None:
    import pyarrow as pa
    import torch
    from eval_throughput import own_last_turn

    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA, HFGenerate, batch_order
    from agentflan_ray.jobs.eval import case_rows
    from agentflan_ray.storage import StorageConfig

    rows = [json.loads(line) for line in (REPO / "jobs/configs/eval_demo_agent_h.jsonl").read_text().splitlines()]
    count, new_tokens = (16, 8) if args.dry_run else (args.eval_cases, 32)
    cases = sorted(case_rows([own_last_turn({**rows[i % len(rows)], "id": f"case-{i}"}, i) for i in range(count)]),
                   key=batch_order)  # as the job orders them
    generate = HFGenerate(args.model, StorageConfig(), new_tokens, device=args.device)
    cuda = args.device == "cuda"
    replies, seconds = {}, {}
    for batch in (1, 4) if args.dry_run else (1, 8, 32):
        tables = [pa.Table.from_pylist(cases[i:i + batch], schema=CASE_ROW_SCHEMA) for i in range(0, count, batch)]
        generate(tables[0])  # warm-up: kernels chosen, memory pools filled
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = [row for table in tables for row in generate(table).to_pylist()]
        if cuda:
            torch.cuda.synchronize()
        seconds[batch] = time.perf_counter() - started
        replies[batch] = {row["id"]: row["reply"] for row in out}
        emit({"part": "eval", "batch": batch, "cases": count, "max_new_tokens": new_tokens,
              "cases_per_s": round(count / seconds[batch], 2), "seconds": round(seconds[batch], 2),
              "ended_early": sum(row["finish_reason"] == "stop" for row in out),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "speedup": round(seconds[1] / seconds[batch], 2),
              "same_replies_as_one_at_a_time": sum(replies[batch][key] == replies[1][key] for key in replies[1])})


# ----------------------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sub(args, command: str, *extra: str, timeout: float) -> tuple[int, list[dict]]:
    """Run one part in its own process (a fresh CUDA context and allocator); its JSON lines. With a
    deadline, a part gets at most the time left, and none when less than a minute is left."""
    if args.deadline:
        left = args.deadline - (time.monotonic() - args.started)
        if left < 60:
            return 124, [{"part": command, "error": f"skipped: {left:.0f} s left of the {args.deadline:.0f} s deadline",
                          "args": list(extra)}]
        timeout = min(timeout, left - 5)
    argv = [sys.executable, __file__, command, "--work", args.work, "--device", args.device, "--inputs", args.inputs,
            "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--accumulation", str(args.accumulation),
            *(["--dry-run"] if args.dry_run else []), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    started = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as exc:  # its output is bytes whatever text= says
        stdout, stderr = (exc.stdout or b"").decode(errors="replace"), (exc.stderr or b"").decode(errors="replace")
        records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        return 124, [*records, {"part": command, "error": f"timed out after {timeout:.0f} s", "args": list(extra),
                                "stderr_tail": stderr[-2500:]}]
    if args.out:  # the whole output of each part beside the figures
        name = "-".join([command, *[e for e in extra if e in ("none", "liger")]])
        with open(Path(args.out) / f"{name}.log", "a") as f:
            f.write(done.stdout + done.stderr)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode not in (0, 3) or not records:
        records.append({"part": command, "error": f"exit {done.returncode}", "args": list(extra),
                        "seconds": round(time.monotonic() - started, 1), "stderr_tail": done.stderr[-2500:]})
    return done.returncode, records


def run_all(args) -> int:
    import torch

    started = args.started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.dry_run
    args.device = "cuda" if cuda else "cpu"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (Path(args.inputs) / "samples").exists():
        raise SystemExit(f"{args.inputs} is missing: run `python bench/gpu_check.py prepare` first")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = []

    def record(items: list[dict]) -> None:
        for item in items:
            item.setdefault("elapsed_s", round(time.monotonic() - started, 1))
            lines.append(item)
            emit(item)
            if out:
                with open(out / "gpu_check.jsonl", "a") as f:
                    f.write(json.dumps(item, default=str) + "\n")

    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for name in ("transformers", "deepspeed", "ray", "liger_kernel", "triton"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "installed")
        except Exception as exc:  # a missing package is a finding, not a crash
            versions[name] = f"missing ({type(exc).__name__}: {exc})"[:200]
    samples = replicate_samples(Path(args.inputs) / "samples", work / "samples", args.copies)
    model = make_model(Path(args.inputs) / "tokenizer", work / ("model-tiny" if args.dry_run else "model-1b"),
                       TINY if args.dry_run else ONE_B, args.device)
    record([{"part": "setup", **versions, "samples": samples}])

    parts = set(args.only.split(",")) if args.only else {"correctness", "throughput", "ray", "eval"}
    if "correctness" in parts:
        record(sub(args, "correctness", timeout=args.part_timeout)[1])
    best = None
    if "throughput" in parts:
        kernels = ["none", "liger"] if cuda and not versions["liger_kernel"].startswith("missing") else ["none"]
        kernels = [k for k in kernels if k in args.kernels.split(",")]
        for fused in kernels:
            micro = args.micro
            for _ in range(2):  # once more with a smaller micro-batch if it ran out of memory
                code, records = sub(args, "bare", "--model", str(model), "--fused", fused, "--micro", str(micro),
                                    *(["--profile", str(args.profile_steps)] if fused == kernels[-1] else []),
                                    timeout=args.part_timeout)
                record(records)
                if code != 3:
                    break
                micro = max(1, int(records[-1]["micro_batch"] * 0.7))
            done = [r for r in records if r.get("loop") == "bare_deepspeed"]
            if done and (best is None or done[0]["tokens_per_s"] > best["tokens_per_s"]):
                best = done[0]
    if "ray" in parts:
        micro = best["micro_batch"] if best else max(args.micro, 1)
        fused = best["fused_kernels"] if best else "none"
        _, records = sub(args, "ray", "--model", str(model), "--fused", fused, "--micro", str(micro),
                         timeout=args.part_timeout)
        record(records)
        ray_run = next((r for r in records if r.get("loop") == "ray_train"), None)
        if ray_run and best:
            record([{"part": "ray_over_bare", "ray_tokens_per_s": ray_run["tokens_per_s"],
                     "bare_tokens_per_s": best["tokens_per_s"],
                     "ratio": round(ray_run["tokens_per_s"] / best["tokens_per_s"], 4),
                     # Ray Data packed the rows the bare loop packed without Ray
                     "same_rows": (ray_run["rows"], ray_run["real_tokens_total"]) == (best["rows"],
                                                                                      best["real_tokens_total"]),
                     "micro_batch": micro, "fused_kernels": fused}])
    if "eval" in parts:
        record(sub(args, "eval", "--model", str(model), timeout=args.part_timeout)[1])
    failures = [r for r in lines if r.get("error") or r.get("pass") is False]
    record([{"part": "summary", "failures": len(failures)}])
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="all",
                        choices=["all", "prepare", "correctness", "bare", "ray", "eval"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps (what CI runs)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "agentflan-gpu-check"))
    parser.add_argument("--out", default="", help="also write gpu_check.jsonl here")
    parser.add_argument("--only", default="", help="comma-separated parts: correctness,throughput,ray,eval")
    parser.add_argument("--eval-cases", type=int, default=64, help="eval: cases per batch size")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=0, help="packed row length (4096; 1024 on a dry run)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (8; 4 on a dry run)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--micro", type=int, default=0, help="micro-batch; 0: chosen to fill the GPU")
    parser.add_argument("--copies", type=int, default=0, help="times the carried samples are replicated")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--kernels", default="none,liger", help="throughput: which fused_kernels settings")
    parser.add_argument("--part-timeout", type=float, default=300.0, help="seconds per part at most")
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds for everything; parts that "
                        "would start with less than a minute left are skipped (0: none)")
    parser.add_argument("--model", default="")
    parser.add_argument("--fused", default="none")
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--inputs", default=str(DEFAULT_INPUTS), help="the carried samples and tokenizer")
    parser.add_argument("--demo", default=os.path.join(tempfile.gettempdir(), "agentflan-gpu-check-demo"))
    args = parser.parse_args()
    args.seq_len = args.seq_len or (1024 if args.dry_run else 4096)
    args.steps = args.steps or (4 if args.dry_run else 8)
    args.copies = args.copies or (2 if args.dry_run else 30)
    if args.dry_run and args.micro == 0:
        args.micro = 2
    if args.command == "all":
        sys.exit(run_all(args))
    {"prepare": prepare, "correctness": correctness, "bare": bare, "ray": through_ray,
     "eval": eval_generate}[args.command](args)


if __name__ == "__main__":
    main()
