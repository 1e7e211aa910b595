"""One DeepSpeed engine per worker and one micro-batch through it, without Ray.

    load_model (dtype, attention kernel, fused kernels, gradient checkpointing)
      -> deepspeed.initialize(build_deepspeed_config(config, ...))
    per micro-batch: to_device -> attention inputs -> forward -> backward -> step

The Ray Train loop (loop.py) and the bare DeepSpeed loop of the benchmarks both run these
functions, so the Ray Train overhead they measure is Ray's alone.

Fused kernels: with ``fused_kernels: auto`` a GPU worker with ``liger-kernel`` installed patches the
model with Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, and the fused linear cross-entropy that
never materializes the (tokens x vocabulary) logits). Under ZeRO-3 the LM head's weight is partitioned
and only gathered when the head itself runs, so the fused linear cross-entropy, which reads the weight
directly, is replaced by Liger's plain cross-entropy there.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentflan_ray.training.attention import attention_inputs, select_attention
from agentflan_ray.training.deepspeed_config import build_deepspeed_config

if TYPE_CHECKING:
    from agentflan_ray.jobs.train import TrainConfig

logger = logging.getLogger(__name__)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def select_fused_kernels(requested: str, on_gpu: bool, zero_stage: int, model_type: str,
                         installed: bool | None = None, supported: set[str] | None = None) -> dict | None:
    """Liger's patch options for this worker, or None for the model's own modules."""
    if requested == "none":
        return None
    installed = liger_installed() if installed is None else installed
    if requested == "auto" and not (on_gpu and installed):
        return None
    if not installed:
        raise RuntimeError("fused_kernels=liger needs the liger-kernel package on every training node "
                           "(pip install 'agentflan-ray[gpu]')")
    if not on_gpu:
        raise RuntimeError("fused_kernels=liger needs GPU workers (use_gpu=true): Liger's kernels are Triton")
    if supported is None:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        supported = set(MODEL_TYPE_TO_APPLY_LIGER_FN)
    if model_type not in supported:
        if requested == "auto":
            logger.info("no Liger kernels for model type %r; training with the model's own modules", model_type)
            return None
        raise RuntimeError(f"fused_kernels=liger: Liger has no kernels for model type {model_type!r}")
    fused_loss = zero_stage < 3
    return {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": fused_loss,
            "cross_entropy": not fused_loss}


@dataclass
class Engine:
    engine: object  # deepspeed.DeepSpeedEngine
    accumulation: int  # micro-batches per optimizer step on this world size
    model_config: object  # the Hugging Face config
    attention: str  # the attention implementation in use
    fused_kernels: dict | None  # Liger's patch options, or None

    @property
    def device(self):
        return self.engine.device

    def describe(self) -> str:
        kernels = "liger" if self.fused_kernels else "none"
        return f"attention={self.attention} fused_kernels={kernels}"


def load_model(config: TrainConfig, attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=torch.bfloat16 if config.use_gpu else torch.float32, attn_implementation=attention)
    model.config.use_cache = False  # training: no KV cache to build on every forward
    fused = select_fused_kernels(config.fused_kernels, config.use_gpu, config.zero_stage, model.config.model_type)
    if fused:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, **fused)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained returns the model in eval mode, and DeepSpeed does not change it: without this,
    # gradient checkpointing and Liger's fused loss (both only in training mode) are silently skipped.
    model.train()
    return model, fused


def setup_engine(config: TrainConfig, world_size: int, total_steps: int, load_universal: bool = False) -> Engine:
    import deepspeed

    attention = select_attention(config.attention, config.use_gpu)
    model, fused = load_model(config, attention)
    ds_config = build_deepspeed_config(config, world_size, total_steps, load_universal=load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return Engine(engine, ds_config["gradient_accumulation_steps"], model.config, attention, fused)


def to_device(batch: dict, device) -> dict:
    """Tensors of a micro-batch onto the training device without waiting (pinned memory on GPU)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def micro_batch_loss(bundle: Engine, batch: dict):
    """Loss of one packed micro-batch already on the device; samples never attend to each other."""
    kwargs = attention_inputs(batch["position_ids"], bundle.attention, bundle.engine.module.dtype)
    return bundle.engine(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **kwargs).loss


def train_micro_batch(bundle: Engine, batch: dict):
    """Forward, backward and (at the accumulation boundary, DeepSpeed decides) the optimizer step."""
    loss = micro_batch_loss(bundle, batch)
    bundle.engine.backward(loss)
    bundle.engine.step()
    return loss


def expected_row(micro: int, micro_batch: int, block_rows: int, world_size: int, rank: int) -> int:
    """Row number of the first row of micro-batch ``micro`` (of this epoch) on ``rank``: blocks of
    ``block_rows`` rows are dealt round robin over the ranks (data.py)."""
    block, offset = divmod(micro * micro_batch, block_rows)
    return (block * world_size + rank) * block_rows + offset


class StepMeter:
    """Sums over the micro-batches of one optimizer step, all-reduced over workers at the step.

    ``wait`` times the loop spends blocked on the data iterator (``waiting()``), so the share of a
    step lost to ingest is measured rather than guessed."""

    def __init__(self, device):
        import torch

        # loss, micro-batches, trained tokens, real tokens, data wait seconds, "report now" (rank 0's vote)
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.wait = 0.0
        self.started = time.monotonic()

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, loss, batch: dict) -> None:
        import torch

        self.sums[:4] += torch.stack([loss.detach().double(), self.sums.new_tensor(1.0),
                                      (batch["labels"] != -100).sum().double(), batch["real_tokens"].sum().double()])

    def finish(self, vote_report: bool = False) -> dict:
        """The step's sums over all workers; ``report`` is rank 0's vote, the same on every rank,
        and ``data_wait_s`` the workers' mean wait for data during the step."""
        import torch.distributed as dist

        self.sums[4] = self.wait
        self.sums[5] = float(vote_report)
        workers = 1
        if dist.is_initialized():
            dist.all_reduce(self.sums)
            workers = dist.get_world_size()
        loss, micro, trained, real, wait, report = self.sums.tolist()
        seconds = max(time.monotonic() - self.started, 1e-9)
        self.sums.zero_()
        self.wait = 0.0
        self.started = time.monotonic()
        return {"loss": loss / micro, "trained_tokens": trained, "tokens": real, "seconds": seconds,
                "data_wait_s": wait / workers, "report": report > 0}
