"""What each Ray Train worker runs: DeepSpeed engine, resume, packed micro-batches, metrics.

    resume_point -> setup_engine (+ load_checkpoint) -> per optimizer step:
        `accumulation` micro-batches (forward, backward, engine.step) -> step_metrics (all-reduced)
        -> report every log_every steps, checkpoint every checkpoint_every steps and at the end

Data position: worker r of n gets blocks r, r+n, r+2n, ... of the epoch (see data.py), so after
``s`` optimizer steps of an epoch every worker skips ``s x accumulation`` micro-batches and the whole
group skips exactly ``s x global_batch`` rows, on any world size. Every micro-batch's first row
number is checked against that; a mismatch is counted in ``rows_out_of_order`` and logged.
"""

from __future__ import annotations

import logging
import time

import ray.train

from agentflan_ray.config import TrainConfig, build
from agentflan_ray.storage import filesystem
from agentflan_ray.training.checkpoints import resume_point, save_and_report
from agentflan_ray.training.deepspeed_config import DeepSpeedSettings, build_deepspeed_config
from agentflan_ray.training.metrics import TensorBoard, flops_per_token, peak_flops
from agentflan_ray.training.packing import block_causal_mask

logger = logging.getLogger(__name__)


def deepspeed_settings(config: TrainConfig, total_steps: int) -> DeepSpeedSettings:
    return DeepSpeedSettings(
        zero_stage=config.zero_stage, offload_optimizer=config.offload_optimizer, offload_params=config.offload_params,
        bf16=config.use_gpu, global_batch=config.global_batch, micro_batch=config.micro_batch, lr=config.lr,
        warmup_ratio=config.warmup_ratio, total_steps=total_steps,
    )


def attention_implementation(config: TrainConfig) -> str | None:
    """``flash_attention_2`` (variable-length, from position ids) or None for the model's default."""
    if config.attention != "auto":
        return config.attention
    if config.use_gpu:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return None
        return "flash_attention_2"
    return None


def setup_engine(config: TrainConfig, world_size: int, total_steps: int, load_universal: bool):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    kwargs = {"dtype": torch.bfloat16 if config.use_gpu else torch.float32}
    if attention := attention_implementation(config):
        kwargs["attn_implementation"] = attention
    model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds_config = build_deepspeed_config(deepspeed_settings(config, total_steps), world_size)
    if not config.use_gpu:
        ds_config["optimizer"]["params"]["torch_adam"] = True  # no fused CUDA Adam on CPU
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine, ds_config["gradient_accumulation_steps"], model.config


def forward_loss(engine, batch: dict, varlen: bool):
    """Loss of one packed micro-batch; samples never attend to each other."""
    kwargs = {"position_ids": batch["position_ids"]}
    if not varlen:
        kwargs["attention_mask"] = block_causal_mask(batch["position_ids"], engine.module.dtype)
    return engine(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss


class StepMeter:
    """Sums over the micro-batches of one optimizer step, all-reduced over workers at the step."""

    def __init__(self, device):
        import torch

        # loss, micro-batches, trained tokens, real tokens, "report now" (rank 0's vote)
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.started = time.monotonic()

    def add(self, loss, batch: dict) -> None:
        import torch

        self.sums[:4] += torch.stack([loss.detach().double(), self.sums.new_tensor(1.0),
                                      (batch["labels"] != -100).sum().double(), batch["real_tokens"].sum().double()])

    def finish(self, vote_report: bool = False) -> dict:
        """The step's sums over all workers; ``report`` is rank 0's vote, the same on every rank."""
        import torch.distributed as dist

        self.sums[4] = float(vote_report)
        if dist.is_initialized():
            dist.all_reduce(self.sums)
        loss, micro, trained, real, report = self.sums.tolist()
        seconds = max(time.monotonic() - self.started, 1e-9)
        self.sums.zero_()
        self.started = time.monotonic()
        return {"loss": loss / micro, "trained_tokens": trained, "tokens": real, "seconds": seconds,
                "report": report > 0}


def train_loop_per_worker(loop_config: dict) -> None:
    import torch

    config = build(TrainConfig, loop_config["config"], "")
    total_steps, steps_per_epoch = loop_config["total_steps"], loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    with resume_point(world_size, context.get_local_rank()) as resume:
        engine, accumulation, model_config = setup_engine(config, world_size, total_steps, resume.universal)
        if resume.directory:
            engine.load_checkpoint(resume.directory, load_module_strict=True)
    step = resume.state["step"]
    resumed_from, varlen = step, attention_implementation(config) == "flash_attention_2"
    flops = flops_per_token(model_config, config.max_seq_len)
    peak = config.peak_flops_per_worker or (peak_flops(torch.cuda.get_device_name()) if config.use_gpu else 0.0)
    board = tensorboard(config, loop_config) if rank == 0 else None
    meter, out_of_order = StepMeter(engine.device), 0
    steady = {"tokens": 0.0, "seconds": 0.0}  # from the end of the first step of this (re)start
    last_report = time.monotonic()
    shard = ray.train.get_dataset_shard("train")
    while step < total_steps:
        # Every epoch has exactly steps_per_epoch steps, so the step alone is the data position.
        epoch, micro, skip = step // steps_per_epoch, 0, step % steps_per_epoch * accumulation
        for batch in shard.iter_torch_batches(batch_size=config.micro_batch, dtypes=torch.long, drop_last=True,
                                              device=engine.device):
            if micro >= steps_per_epoch * accumulation or step >= total_steps:
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
            loss = forward_loss(engine, batch, varlen)
            engine.backward(loss)
            engine.step()
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
                "world_size": world_size, "resumed_from": resumed_from, "rows_out_of_order": out_of_order,
                "data_position": (step - epoch * steps_per_epoch) * config.global_batch,  # rows of this epoch
            }
            if peak:
                metrics["mfu"] = flops * measured["tokens"] / measured["seconds"] / (peak * world_size)
            if board and step % config.log_every == 0:
                board.scalars(metrics, step)
            # Every ray.train.report is a barrier, and Ray Train takes one report per health check
            # (2 s): reporting every step would stall fast steps. So metrics go to Ray Train at most
            # every report_interval_s (rank 0 decides, in the all-reduce above) and with checkpoints.
            if step % config.checkpoint_every == 0 or step == total_steps:
                if board:
                    board.sync()
                save_and_report(engine, metrics, {"step": step, "world_size": world_size})
                last_report = time.monotonic()
            elif measured["report"]:
                ray.train.report(metrics)
                last_report = time.monotonic()
    if board:
        board.close()


def expected_row(micro: int, micro_batch: int, block_rows: int, world_size: int, rank: int) -> int:
    """Row number of the first row of micro-batch ``micro`` (of this epoch) on ``rank``."""
    block, offset = divmod(micro * micro_batch, block_rows)
    return (block * world_size + rank) * block_rows + offset


def tensorboard(config: TrainConfig, loop_config: dict) -> TensorBoard | None:
    try:
        fs, root = filesystem(config.storage_path, config.storage)
        board = TensorBoard(f"{root.rstrip('/')}/{config.run_name}/tensorboard", fs)
    except Exception as exc:  # metrics still reach Ray Train; say why the event files will not exist
        logger.warning("no TensorBoard logs: %s", exc)
        return None
    for capability, tokens in loop_config.get("trained_tokens", {}).items():
        board.writer.add_scalar(f"data/trained_tokens/{capability}", tokens, 0)
    return board
