"""The DeepSpeed config, built by one plain function from the typed training config.

The dict it returns is the one ``deepspeed.initialize`` gets; nothing patches it afterwards.

AdamW (``optimizer``): ``torch`` is PyTorch's own, with its fused CUDA kernel on GPU (``fused=True``:
part of PyTorch, nothing to compile) and the multi-tensor path on CPU. ``deepspeed`` is DeepSpeed's
FusedAdam on GPU, or its CPUAdam when the optimizer is offloaded; DeepSpeed compiles these just in
time on first use (on GPU nodes that needs nvcc and minutes per node) unless its wheel was built
with the ops. ``auto``: ``deepspeed`` with ``offload_optimizer`` (CPUAdam is several times faster
than PyTorch's AdamW on CPU and needs only a C++ compiler), ``torch`` otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentflan_ray.jobs.train import TrainConfig



def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Steps to accumulate so that a step always sees ``global_batch`` sequences, whatever the
    world size. The global batch must divide evenly; a resize keeps it fixed."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ValueError(f"global_batch={global_batch} is not a multiple of micro_batch x workers = {per_pass}")
    return global_batch // per_pass


def optimizer_kind(config: TrainConfig) -> str:
    if config.optimizer != "auto":
        return config.optimizer
    return "deepspeed" if config.offload_optimizer else "torch"


def optimizer_params(config: TrainConfig) -> dict:
    params = {"lr": config.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": config.weight_decay}
    if optimizer_kind(config) == "deepspeed":
        return params
    params["torch_adam"] = True
    if config.use_gpu and not config.offload_optimizer:  # the optimizer runs where the master weights are
        params["fused"] = True
    return params


def build_deepspeed_config(config: TrainConfig, world_size: int, total_steps: int, load_universal: bool = False) -> dict:
    if config.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {config.zero_stage}")
    accumulation = gradient_accumulation(config.global_batch, config.micro_batch, world_size)
    zero: dict = {"stage": config.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.use_gpu}
    if config.offload_params:
        if config.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": config.use_gpu}
    if config.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    warmup = max(1, int(total_steps * config.warmup_ratio))
    ds_config = {
        "train_batch_size": config.global_batch,
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": config.gradient_clipping,
        "bf16": {"enabled": config.use_gpu},  # fp32 on CPU; on GPU bf16 weights, fp32 master copy
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params(config)},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup,
                       "warmup_type": "linear", "cos_min_ratio": 0.1},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.offload_optimizer and optimizer_kind(config) == "torch":
        ds_config["zero_force_ds_cpu_optimizer"] = False  # asked for: PyTorch's AdamW on the CPU copy
    if load_universal:  # a checkpoint written on another world size, converted (checkpoints.py)
        ds_config["checkpoint"] = {"load_universal": True}
    return ds_config
