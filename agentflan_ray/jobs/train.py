"""The `train` job: Ray Train + DeepSpeed supervised fine-tuning over packed shards.

    agentflan-ray train --config jobs/configs/train_demo.yaml data=./out/demo model=./tiny max_steps=20

Driver: preflight (model, the data's manifest) -> prepare_dataset (tokenize + pack in Ray Data,
training/data.py) -> TorchTrainer(training/loop.train_loop_per_worker) -> export. Ray Train restarts the worker group from the latest checkpoint when a worker dies
(``max_failures``), and with ``num_workers: [min, max]`` it resizes the group as nodes come and go.

Resume bound: a checkpoint stores the optimizer step; the restarted group skips exactly
``step x global_batch`` packed rows of the current epoch (see training/loop.py), so no row is repeated or
skipped, also on a different world size. A new job re-packs identically (the shuffle is seeded by
sample id and packing is deterministic), so rerunning with the same run name resumes as exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Literal

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from agentflan_ray.config import ConfigError, JobConfig, require_at_least
from agentflan_ray.storage import filesystem, is_s3
from agentflan_ray.training.checkpoints import final_metrics_location, read_final_metrics
from agentflan_ray.training.data import data_sources, prepare_dataset
from agentflan_ray.training.loop import train_loop_per_worker


@dataclass
class TrainConfig(JobConfig):
    """The `train` job: DeepSpeed SFT over generated shards with Ray Train."""

    # A generate or negatives output (local or s3://), or a list of them; each read through its manifest.
    data: str | list[str] = ""
    # Per stream (a folder of those outputs: general, tflan_cot, negative, ...): a weight that up- or
    # down-samples it (0.5 keeps half, 2 repeats each sample twice; default 1), and/or the share of
    # all samples it is to be after weighting (AgentTuning: {general: 0.8} for 20% agent data).
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    shares: dict[str, float] = dataclasses.field(default_factory=dict)
    # A folder for this run's manifest (data report per root and stream, final metrics, checkpoint);
    # empty: none. The pipeline job uses it to skip a finished training stage.
    output: str = ""
    model: str = ""  # a Hugging Face model directory or hub name
    template: Literal["chat_template", "agentflan", "llama2"] = "chat_template"
    max_seq_len: int = 2048
    overlong: Literal["truncate", "drop"] = "truncate"
    # A number, or [min, max] for an elastic run: Ray Train starts with as many workers as the
    # cluster has room for (at least min) and resizes when nodes come or go; the global batch holds.
    num_workers: int | list[int] = 2
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    # auto: on GPU FlashAttention-2 variable-length attention when flash-attn is installed, else
    # PyTorch's FlexAttention with a per-sample block mask; on CPU sdpa with the exact mask.
    attention: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = "auto"
    # auto: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on GPU
    # workers that have liger-kernel installed; liger: required; none: the model's own modules.
    fused_kernels: Literal["auto", "liger", "none"] = "auto"
    # AdamW implementation: auto, torch (fused CUDA kernel on GPU), deepspeed (JIT-built ops).
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"
    # Logical CPUs per training worker; below 1 on small CPU machines leaves room for Ray Data.
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    global_batch: int = 8  # packed sequences per optimizer step
    micro_batch: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    warmup_ratio: float = 0.03
    epochs: int = 3
    max_steps: int = 0  # 0: epochs decide
    log_every: int = 1  # steps between TensorBoard points
    # Seconds between metric reports to Ray Train (each is a barrier; checkpoints always report).
    report_interval_s: float = 10.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # false: no checkpoint at the last step unless checkpoint_every falls on it (throughput trials)
    checkpoint_at_end: bool = True
    # Peak FLOP/s per worker for the MFU figure; 0: looked up from the GPU's name (none on CPU).
    peak_flops_per_worker: float = 0.0
    max_failures: int = 2
    storage_path: str = "./out/checkpoints"
    run_name: str = "agentflan-sft"
    export_dir: str = ""
    # Local directory on every node for a resize's universal checkpoint copy (about the
    # checkpoint's size, removed once loaded); empty: the system's temporary directory.
    scratch_dir: str = ""
    seed: int = 0

    def validate(self, key: str = "") -> None:
        if not self.roots:
            raise ConfigError("data: required (a generate or negatives output directory, or a list of them)")
        for name, values in (("weights", self.weights), ("shares", self.shares)):
            for stream, value in values.items():
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ConfigError(f"{name}.{stream}: must be a number, 0 or more, got {value!r}")
        if self.shares and not (0 < sum(self.shares.values()) < 1 and all(self.shares.values())):
            raise ConfigError(f"shares: each share above 0 and together below 1, got {self.shares}")
        if not self.model:
            raise ConfigError("model: required (a model directory, e.g. from make-tiny-model)")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"zero_stage: must be 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params: needs zero_stage=3 (ZeRO-2 keeps the parameters on the GPU)")
        if is_s3(self.scratch_dir):
            raise ConfigError(f"scratch_dir: must be a local directory (on every node), got {self.scratch_dir!r}")
        if self.export_dir and not self.checkpoint_at_end:
            raise ConfigError("checkpoint_at_end: must be true with export_dir (the export is made from it)")
        require_at_least(self, key, ("max_seq_len", "global_batch", "micro_batch", "epochs",
                                     "log_every", "checkpoint_every", "keep_checkpoints"), 1)
        if isinstance(self.num_workers, list) and (len(self.num_workers) != 2 or self.num_workers[0] > self.num_workers[1]):
            raise ConfigError(f"num_workers: a number or [min, max] with min <= max, got {self.num_workers}")
        if self.min_workers < 1:
            raise ConfigError(f"num_workers: must be at least 1, got {self.num_workers}")
        uneven = [n for n in range(self.min_workers, self.max_workers + 1) if self.global_batch % (self.micro_batch * n)]
        if uneven:
            raise ConfigError(f"global_batch: {self.global_batch} is not a multiple of micro_batch x workers for "
                              f"{uneven} workers (micro_batch={self.micro_batch}); the global batch must hold at "
                              f"every size num_workers allows")

    @property
    def block_rows(self) -> int:
        """Rows per dataset block: the largest size that divides every worker's share of a step
        (global_batch / n) at every allowed world size n, so steps never split a block."""
        return math.gcd(*(self.global_batch // n for n in range(self.min_workers, self.max_workers + 1)))

    @property
    def roots(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data) if self.data else []

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


Config = TrainConfig
NAME = "train"


def preflight(config: TrainConfig) -> TrainConfig:
    """On the driver, before Ray starts: local paths made absolute, the model loadable, and the data a
    finished generate output (its manifest lists the shards; a half-written output stops here)."""
    from transformers import AutoConfig

    config = absolute_paths(config)
    try:  # a wrong model path fails here, once, not in every worker max_failures times
        AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"model: cannot load {config.model!r}: {exc}") from None
    data_sources(config)  # every root a finished output; weights and shares name real streams
    return config


def run(config: TrainConfig, log=print, prepared: TrainConfig | None = None) -> dict:
    """Train on the connected Ray cluster; the summary: data report, steps, final metrics, checkpoint."""
    from ray.data import ExecutionOptions

    config = prepared or preflight(config)
    dataset, report = prepare_dataset(config)
    log(f"[train] {report['samples']} samples -> {report['rows']} packed rows of {config.max_seq_len} tokens "
        f"(padding {report['padding_share']:.1%}); truncated to max_seq_len: {report['truncated']}; "
        f"skipped: {report['skipped'] or 'none'}")
    steps_per_epoch = report["rows"] // config.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{report['rows']} packed rows are fewer than one global batch ({config.global_batch}); "
                         f"skipped samples: {report['skipped'] or 'none'}")
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    workers = tuple(config.num_workers) if isinstance(config.num_workers, list) else config.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": asdict(config), "steps_per_epoch": steps_per_epoch,
                           "total_steps": total_steps, "trained_tokens": report["trained_tokens"]},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=config.elastic_resize_interval_s),
        run_config=RunConfig(
            name=config.run_name, **checkpoint_storage(config),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": dataset},
        # Order kept and locality off: the split is round robin over micro-batch blocks (data.py).
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                  enable_shard_locality=False),
    )
    fs, final = final_metrics_location(config.storage_path, config.run_name, config.storage)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(final)  # an earlier run's
    result = trainer.fit()
    summary = {"data": report, "steps": total_steps,
               "metrics": read_final_metrics(fs, final) or result.metrics or {},
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if config.export_dir and result.checkpoint is not None:
        summary["export_dir"] = export_model(config, result.checkpoint)
    m = summary["metrics"]
    log(f"[train] done: step {m.get('step')} of {total_steps} on {m.get('world_size')} workers (this attempt "
        f"resumed at step {m.get('resumed_from')}), loss {m.get('loss', math.nan):.4f}, "
        f"{m.get('avg_tokens_per_s', 0):,.0f} tokens/s; checkpoint {summary['checkpoint']}"
        + (f"; model exported to {summary['export_dir']}" if "export_dir" in summary else ""))
    log("[train] summary " + json.dumps(summary, default=str))
    if config.output and succeeded(summary):
        write_manifest(config, summary)
    return summary


def write_manifest(config: TrainConfig, summary: dict) -> None:
    """``<output>/manifest.json``: every sample (after weighting) packed or skipped with its reason,
    the data report, the final metrics, the checkpoint and the exported model."""
    from agentflan_ray.writing.accounting import Tally
    from agentflan_ray.writing.manifest import build_manifest, finish_output, start_output

    report = summary["data"]
    tally = Tally()
    tally.read("samples", report["samples"])
    tally.outcome("samples", "written", n=report["packed"])
    for reason, n in report["skipped"].items():
        tally.outcome("samples", "quarantined", reason, n)
    start_output(config.output, config.storage)
    finish_output(config.output, config.storage, (), build_manifest(
        NAME, config, tally, data=report, steps=summary["steps"], metrics=summary["metrics"],
        checkpoint=summary["checkpoint"], export_dir=summary.get("export_dir")))


def succeeded(summary: dict) -> bool:
    return summary["metrics"].get("step") == summary["steps"]


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray Train workers do not run in the driver's working directory."""
    changes = {}
    for name in ("storage_path", "export_dir", "scratch_dir", "output"):
        value = getattr(config, name)
        if value and not is_s3(value):
            changes[name] = os.path.abspath(value)
    roots = [root if is_s3(root) else os.path.abspath(root) for root in config.roots]
    changes["data"] = roots[0] if isinstance(config.data, str) else roots
    if os.path.isdir(config.model):  # else a hub name, e.g. meta-llama/Llama-2-7b-chat-hf
        changes["model"] = os.path.abspath(config.model)
    return dataclasses.replace(config, **changes)


def checkpoint_storage(config: TrainConfig) -> dict:
    """Checkpoints on S3 go through the same pyarrow client and endpoint as the data; a local
    storage_path is already absolute (absolute_paths)."""
    if not is_s3(config.storage_path):
        return {"storage_path": config.storage_path}
    fs, path = filesystem(config.storage_path, config.storage)
    return {"storage_path": path, "storage_filesystem": fs}


def export_model(config: TrainConfig, checkpoint) -> str:
    """Consolidate the DeepSpeed checkpoint (ZeRO-2 or -3) into a Hugging Face model directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with checkpoint.as_directory() as directory:
        state_dict = get_fp32_state_dict_from_zero_checkpoint(directory)
    model = AutoModelForCausalLM.from_pretrained(config.model)
    model.load_state_dict(state_dict, strict=False)
    if not is_s3(config.export_dir):
        model.save_pretrained(config.export_dir)
        AutoTokenizer.from_pretrained(config.model).save_pretrained(config.export_dir)
        return config.export_dir
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="afr-export-") as local:  # written here, then uploaded
        model.save_pretrained(local)
        AutoTokenizer.from_pretrained(config.model).save_pretrained(local)
        fs, target = filesystem(config.export_dir, config.storage)
        fs.create_dir(target, recursive=True)
        pafs.copy_files(local, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return config.export_dir
