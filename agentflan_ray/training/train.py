"""The `train` job: Ray Train + DeepSpeed supervised fine-tuning over packed shards.

    agentflan-ray train --config jobs/configs/train_demo.yaml data=./out/demo model=./tiny max_steps=20

Driver: prepare_dataset (tokenize + pack in Ray Data) -> TorchTrainer(loop.train_loop_per_worker)
-> export. Ray Train restarts the worker group from the latest checkpoint when a worker dies
(``max_failures``), and with ``num_workers: [min, max]`` it resizes the group as nodes come and go.

Resume bound: a checkpoint stores the optimizer step; the restarted group skips exactly
``step x global_batch`` packed rows of the current epoch (see loop.py), so no row is repeated or
skipped, also on a different world size. A new job re-packs identically (the shuffle is seeded by
sample id and packing is deterministic), so rerunning with the same run name resumes as exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import asdict

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from agentflan_ray.config import TrainConfig
from agentflan_ray.storage import filesystem, is_s3
from agentflan_ray.training.checkpoints import final_metrics_location, read_final_metrics
from agentflan_ray.training.data import prepare_dataset
from agentflan_ray.training.loop import train_loop_per_worker


def run_train(config: TrainConfig, log=print) -> dict:
    from ray.data import ExecutionOptions
    from transformers import AutoConfig

    config = absolute_paths(config)
    try:  # a wrong model path fails here, once, not in every worker max_failures times
        AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"model: cannot load {config.model!r}: {exc}") from None
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
    return summary


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray Train workers do not run in the driver's working directory."""
    changes = {}
    for name in ("data", "storage_path", "export_dir"):
        value = getattr(config, name)
        if value and not is_s3(value):
            changes[name] = os.path.abspath(value)
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
    model.save_pretrained(config.export_dir)
    AutoTokenizer.from_pretrained(config.model).save_pretrained(config.export_dir)
    return config.export_dir
