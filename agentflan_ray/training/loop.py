"""What each Ray Train worker runs: DeepSpeed engine, resume, packed micro-batches, metrics.

    resume_point -> setup_engine (+ load_checkpoint) -> per optimizer step:
        `accumulation` micro-batches (engine.train_micro_batch) -> StepMeter.finish (all-reduced)
        -> TensorBoard every log_every steps, Ray Train every report_interval_s,
           checkpoint every checkpoint_every steps and at the end

Data position: worker r of n gets blocks r, r+n, r+2n, ... of the epoch (see data.py), so after
``s`` optimizer steps of an epoch every worker skips ``s x accumulation`` micro-batches and the whole
group skips exactly ``s x global_batch`` rows, on any world size. Every micro-batch's first row
number is checked against that; a mismatch is counted in ``rows_out_of_order`` and logged.
"""

from __future__ import annotations

import logging
import time

import ray.train

from agentflan_ray.config import build
from agentflan_ray.storage import filesystem
from agentflan_ray.training.checkpoints import (
    final_metrics_location,
    resume_point,
    save_and_report,
    write_final_metrics,
)
from agentflan_ray.training.engine import StepMeter, expected_row, setup_engine, to_device, train_micro_batch
from agentflan_ray.training.metrics import TensorBoard, flops_per_token, peak_flops

logger = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict) -> None:
    import torch

    from agentflan_ray.jobs.train import TrainConfig

    config = build(TrainConfig, loop_config["config"], "")
    total_steps, steps_per_epoch = loop_config["total_steps"], loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    with resume_point(world_size, context.get_local_rank(), config.scratch_dir) as resume:
        bundle = setup_engine(config, world_size, total_steps, resume.universal)
        if resume.directory:
            bundle.engine.load_checkpoint(resume.directory, load_module_strict=True)
    engine, accumulation = bundle.engine, bundle.accumulation
    if rank == 0:
        logger.info("training with %s on %d workers", bundle.describe(), world_size)
    step = resume.state["step"]
    resumed_from = step
    flops = flops_per_token(bundle.model_config, config.max_seq_len)
    peak = config.peak_flops_per_worker or (peak_flops(torch.cuda.get_device_name()) if config.use_gpu else 0.0)
    board = tensorboard(config, loop_config) if rank == 0 else None
    meter, out_of_order = StepMeter(engine.device), 0
    steady = {"tokens": 0.0, "seconds": 0.0}  # from the end of the first step of this (re)start
    last_report = time.monotonic()
    shard = ray.train.get_dataset_shard("train")
    while step < total_steps:
        # Every epoch has exactly steps_per_epoch steps, so the step alone is the data position.
        epoch, micro, skip = step // steps_per_epoch, 0, step % steps_per_epoch * accumulation
        # Batches arrive on the CPU (pinned on GPU) and are checked there, then copied without a
        # wait: reading a row number off the GPU would stall every micro-batch.
        batches = iter(shard.iter_torch_batches(batch_size=config.micro_batch, dtypes=torch.long, drop_last=True,
                                                device="cpu", pin_memory=config.use_gpu))
        while micro < steps_per_epoch * accumulation and step < total_steps:
            asked = time.monotonic()
            batch = next(batches, None)
            meter.waited(time.monotonic() - asked)
            if batch is None:
                break
            expected = expected_row(micro, config.micro_batch, config.block_rows, world_size, rank)
            if int(batch["row"][0]) != expected:
                out_of_order += 1
                if out_of_order == 1:
                    logger.warning("micro-batch %d of rank %d starts at row %d, expected %d: the dataset split "
                                   "is not round robin, so a resume may repeat or skip rows", micro, rank,
                                   int(batch["row"][0]), expected)
            micro += 1
            if micro <= skip:
                continue
            batch = to_device(batch, engine.device)
            loss = train_micro_batch(bundle, batch)
            meter.add(loss, batch)
            if micro % accumulation:
                continue
            step += 1
            measured = meter.finish(rank == 0 and time.monotonic() - last_report >= config.report_interval_s)
            if step > resumed_from + 1:
                steady["tokens"] += measured["tokens"]
                steady["seconds"] += measured["seconds"]
            metrics = {
                "step": step, "epoch": epoch, "loss": measured["loss"], "lr": engine.get_lr()[0],
                "tokens_per_s": measured["tokens"] / measured["seconds"],
                "avg_tokens_per_s": steady["tokens"] / steady["seconds"] if steady["seconds"] else 0.0,
                "trained_tokens_per_s": measured["trained_tokens"] / measured["seconds"],
                "padding_share": 1 - measured["tokens"] / (config.global_batch * config.max_seq_len),
                "data_wait_share": measured["data_wait_s"] / measured["seconds"],
                "world_size": world_size, "resumed_from": resumed_from, "rows_out_of_order": out_of_order,
                "data_position": (step - epoch * steps_per_epoch) * config.global_batch,  # rows of this epoch
                "attention": bundle.attention, "fused_kernels": "liger" if bundle.fused_kernels else "none",
            }
            if peak:
                metrics["mfu"] = flops * measured["tokens"] / measured["seconds"] / (peak * world_size)
            if config.use_gpu:
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if board and step % config.log_every == 0:
                board.scalars(metrics, step)
            # Every ray.train.report is a barrier, and Ray Train takes one report per health check
            # (2 s): reporting every step would stall fast steps. So metrics go to Ray Train at most
            # every report_interval_s (rank 0 decides, in the all-reduce above) and with checkpoints.
            if step % config.checkpoint_every == 0 or (step == total_steps and config.checkpoint_at_end):
                if board:
                    board.sync()
                save_and_report(engine, metrics, {"step": step, "world_size": world_size})
                last_report = time.monotonic()
            elif measured["report"] or step == total_steps:
                ray.train.report(metrics)
                last_report = time.monotonic()
    if rank == 0 and step > resumed_from:
        write_final_metrics(*final_metrics_location(config.storage_path, config.run_name, config.storage), metrics)
    if board:
        board.close()


def tensorboard(config, loop_config: dict) -> TensorBoard | None:
    try:
        fs, root = filesystem(config.storage_path, config.storage)
        board = TensorBoard(f"{root.rstrip('/')}/{config.run_name}/tensorboard", fs)
    except Exception as exc:  # metrics still reach Ray Train; say why the event files will not exist
        logger.warning("no TensorBoard logs: %s", exc)
        return None
    for capability, tokens in loop_config.get("trained_tokens", {}).items():
        board.writer.add_scalar(f"data/trained_tokens/{capability}", tokens, 0)
    return board
