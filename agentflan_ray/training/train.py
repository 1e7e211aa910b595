"""The `train` job: Ray Train + DeepSpeed supervised fine-tuning over packed shards.

    agentflan-ray train --config jobs/configs/train_demo.yaml data=./out/demo model=./tiny max_steps=20

Driver: prepare_dataset (tokenize + pack in Ray Data) -> TorchTrainer(train_loop_per_worker) ->
export. Each worker: setup_model_and_engine -> load_checkpoint (resume: step and data position) ->
for each optimizer step, ``accumulation`` micro-batches -> report_metrics_and_checkpoint.

Resume bound: a checkpoint stores the global step; a restarted run skips exactly
``step x global_batch`` packed rows of the epoch it was in, so no row is repeated or skipped when
the dataset order is unchanged (the packed dataset is materialized once per job; a new job
re-packs identically because packing is deterministic).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from agentflan_ray.config import TrainConfig
from agentflan_ray.storage import filesystem, is_s3
from agentflan_ray.training.data import prepare_dataset
from agentflan_ray.training.deepspeed_config import DeepSpeedSettings, build_deepspeed_config
from agentflan_ray.training.packing import block_causal_mask

STATE = "agentflan_state.json"


def deepspeed_settings(config: TrainConfig, total_steps: int) -> DeepSpeedSettings:
    return DeepSpeedSettings(
        zero_stage=config.zero_stage, offload_optimizer=config.offload_optimizer, offload_params=config.offload_params,
        bf16=config.use_gpu, global_batch=config.global_batch, micro_batch=config.micro_batch, lr=config.lr,
        warmup_ratio=config.warmup_ratio, total_steps=total_steps,
    )


def setup_model_and_engine(config: TrainConfig, settings: DeepSpeedSettings, world_size: int):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model, torch_dtype=torch.bfloat16 if config.use_gpu else torch.float32)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ds_config = build_deepspeed_config(settings, world_size)
    if not config.use_gpu:
        ds_config["optimizer"]["params"]["torch_adam"] = True  # no fused CUDA Adam on CPU
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine, ds_config["gradient_accumulation_steps"]


def load_checkpoint(engine) -> dict:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "epoch": 0}
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, load_module_strict=True)
        with open(os.path.join(directory, STATE)) as f:
            return json.load(f)


def report_metrics_and_checkpoint(engine, metrics: dict, state: dict, save: bool) -> None:
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory)
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(directory, STATE), "w") as f:
                json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_loop_per_worker(loop_config: dict) -> None:
    import torch

    config = TrainConfig(**{k: v for k, v in loop_config["config"].items() if k != "storage"})
    steps_per_epoch, total_steps = loop_config["steps_per_epoch"], loop_config["total_steps"]
    context = ray.train.get_context()
    world_size = context.get_world_size()
    engine, accumulation = setup_model_and_engine(config, deepspeed_settings(config, total_steps), world_size)
    state = load_checkpoint(engine)
    shard = ray.train.get_dataset_shard("train")
    step, epoch = state["step"], state["epoch"]
    resumed_from = step
    started, tokens = time.monotonic(), 0
    while step < total_steps:
        micro_in_epoch = 0
        skip = (step - epoch * steps_per_epoch) * accumulation  # resume inside this epoch
        for batch in shard.iter_torch_batches(batch_size=config.micro_batch, dtypes=torch.long, drop_last=True):
            if micro_in_epoch < skip:
                micro_in_epoch += 1
                continue
            if micro_in_epoch >= steps_per_epoch * accumulation or step >= total_steps:
                break
            loss = forward_loss(engine, batch, config.use_gpu)
            engine.backward(loss)
            engine.step()
            micro_in_epoch += 1
            tokens += int((batch["labels"] != -100).sum()) * world_size
            if micro_in_epoch % accumulation:
                continue
            step += 1
            metrics = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": engine.get_lr()[0],
                       "trained_tokens_per_s": tokens / max(time.monotonic() - started, 1e-9), "world_size": world_size,
                       "resumed_from": resumed_from}
            save = step % config.checkpoint_every == 0 or step == total_steps
            if step % config.log_every == 0 or save:
                report_metrics_and_checkpoint(engine, metrics, {"step": step, "epoch": epoch}, save)
        epoch += 1


def forward_loss(engine, batch: dict, flash_varlen: bool):
    """Loss of one packed micro-batch; samples never attend to each other."""
    kwargs = {"position_ids": batch["position_ids"]}
    if not flash_varlen:
        seq_lens = [[int(n) for n in row if n > 0] for row in batch["seq_lens"]]
        kwargs["attention_mask"] = block_causal_mask(seq_lens, batch["input_ids"].shape[1])
    return engine(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss


def run_train(config: TrainConfig, log=print) -> dict:
    dataset, report = prepare_dataset(config)
    log(f"[train] {report['samples']} samples -> {report['rows']} packed rows of {config.max_seq_len} tokens "
        f"(padding {report['padding_share']:.1%}); skipped: {report['skipped'] or 'none'}")
    steps_per_epoch = report["rows"] // config.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{report['rows']} packed rows are fewer than one global batch ({config.global_batch})")
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": asdict(config), "steps_per_epoch": steps_per_epoch,
                           "total_steps": total_steps},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name=config.run_name, **checkpoint_storage(config),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    summary = {"data": report, "steps": total_steps, "metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if config.export_dir and result.checkpoint is not None:
        summary["export_dir"] = export_model(config, result.checkpoint)
    log(f"[train] done: step {result.metrics.get('step')}, loss {result.metrics.get('loss', math.nan):.4f}")
    return summary


def checkpoint_storage(config: TrainConfig) -> dict:
    """Checkpoints on S3 go through the same pyarrow client and endpoint as the data."""
    if not is_s3(config.storage_path):
        return {"storage_path": os.path.abspath(config.storage_path)}
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
