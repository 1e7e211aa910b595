"""The DeepSpeed config, built by one plain function from the typed training settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = True
    gradient_clipping: float = 1.0
    global_batch: int = 64  # packed sequences per optimizer step, across all workers
    micro_batch: int = 1  # packed sequences per worker per forward pass
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    total_steps: int = 1000


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Steps to accumulate so that a step always sees ``global_batch`` sequences, whatever the
    world size. The global batch must divide evenly; a resize keeps it fixed."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ValueError(f"global_batch={global_batch} is not a multiple of micro_batch x workers = {per_pass}")
    return global_batch // per_pass


def build_deepspeed_config(settings: DeepSpeedSettings, world_size: int) -> dict:
    if settings.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {settings.zero_stage}")
    accumulation = gradient_accumulation(settings.global_batch, settings.micro_batch, world_size)
    zero: dict = {"stage": settings.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings.offload_params:
        if settings.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    warmup = max(1, int(settings.total_steps * settings.warmup_ratio))
    return {
        "train_batch_size": settings.global_batch,
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": settings.gradient_clipping,
        "bf16": {"enabled": settings.bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": settings.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": settings.weight_decay},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": settings.total_steps, "warmup_num_steps": warmup,
                       "warmup_type": "linear", "cos_min_ratio": 0.1},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
