"""Training metrics: throughput, MFU, and TensorBoard event files beside the checkpoints.

MFU (model FLOPs utilization) follows the PaLM paper's accounting: a trained token costs
``6 N + 12 L H S`` FLOPs (forward and backward through N non-embedding parameters, plus attention
over a context of S tokens in L layers of width H), and MFU is achieved FLOP/s over the peak
dense bf16 FLOP/s of the accelerators. Packed rows count all of their real tokens (padding excluded);
attention is counted at the full row length, a slight overcount for packed rows.
"""

from __future__ import annotations

import os
import tempfile

# Dense bf16 peak per device, FLOP/s (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
}


def peak_flops(device_name: str) -> float:
    """Peak bf16 FLOP/s for a CUDA device name (``torch.cuda.get_device_name()``); 0 when unknown."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return 0.0


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer (see the module docstring)."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden)
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    mlp = 3 * hidden * intermediate  # gate, up, down (SwiGLU)
    non_embedding = layers * (attention + mlp) + hidden * model_config.vocab_size  # + the LM head
    return 6 * non_embedding + 12 * layers * hidden * seq_len


class TensorBoard:
    """Rank 0's event file, written locally and copied to ``<storage>/<run>/tensorboard`` on sync."""

    def __init__(self, destination: str, filesystem):
        from tensorboardX import SummaryWriter

        self.directory = tempfile.TemporaryDirectory(prefix="agentflan-tb-")  # removed on close (or at exit)
        self.local = self.directory.name
        self.destination, self.filesystem = destination, filesystem
        self.writer = SummaryWriter(self.local, flush_secs=30)

    def scalars(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{name}", value, step)

    def sync(self) -> None:
        import pyarrow.fs

        self.writer.flush()
        self.filesystem.create_dir(self.destination, recursive=True)
        for name in os.listdir(self.local):
            pyarrow.fs.copy_files(os.path.join(self.local, name), f"{self.destination}/{name}",
                                  source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=self.filesystem)

    def close(self) -> None:
        self.sync()
        self.writer.close()
        self.directory.cleanup()
