"""Attention over packed rows: which kernel, and the mask each kernel needs.

A packed row holds several samples; position ids restart at 0 where a sample starts (packing.py).
Every implementation computes the same thing, block-diagonal causal attention:

    implementation      where (attention: auto)             what the model gets besides position_ids
    flash_attention_2   GPU with flash-attn installed        nothing: transformers reads the sample
                                                             boundaries from position_ids (varlen)
    flex_attention      GPU without flash-attn (PyTorch's    a FlexAttention BlockMask: causal and same
                        own FlexAttention, compiled Triton)  document, blocks of 128x128 skipped whole
    sdpa / eager        CPU, or asked for                    the exact (batch, 1, L, L) additive mask

The BlockMask and the exact mask are two encodings of one predicate, ``allowed(b, q, kv) =
document[b, q] == document[b, kv] and kv <= q``, with ``document = cumsum(position_ids == 0)``;
tests compare them element by element.
"""

from __future__ import annotations

import importlib.util

IMPLEMENTATIONS = ("flash_attention_2", "flex_attention", "sdpa", "eager")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention(requested: str, on_gpu: bool, flash_available: bool | None = None,
                     flex_available: bool | None = None) -> str:
    """The implementation for ``attention: <requested>`` on this worker. ``auto`` takes the fastest
    exact kernel the worker has; an explicit name is taken as asked (checked by the model load)."""
    if requested != "auto":
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"attention: must be auto or one of {list(IMPLEMENTATIONS)}, got {requested!r}")
        return requested
    if not on_gpu:
        return "sdpa"
    if flash_attn_installed() if flash_available is None else flash_available:
        return "flash_attention_2"
    if flex_attention_available() if flex_available is None else flex_available:
        return "flex_attention"
    return "sdpa"


def document_ids(position_ids):
    """(batch, length) -> which sample of its row each token belongs to (1, 2, ...)."""
    import torch

    return torch.cumsum(position_ids == 0, dim=1)


def document_mask_mod(position_ids):
    """FlexAttention's mask_mod for packed rows: same sample, and not a later token."""
    documents = document_ids(position_ids)

    def allowed(b, h, q_idx, kv_idx):
        return (documents[b, q_idx] == documents[b, kv_idx]) & (kv_idx <= q_idx)

    return allowed


def document_block_mask(position_ids, block_size: int = 128):
    """The FlexAttention BlockMask of a packed micro-batch. Blocks wholly outside every sample are
    skipped by the kernel, so attention costs about sum(len_i^2) per row, not L^2. Built with a
    compiled mask builder on GPU (milliseconds for 8 x 4k), eagerly on CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = position_ids.shape
    return create_block_mask(document_mask_mod(position_ids), batch, None, length, length,
                             device=position_ids.device, BLOCK_SIZE=block_size, _compile=position_ids.is_cuda)


def block_causal_mask(position_ids, dtype=None):
    """The exact (batch, 1, length, length) additive mask: 0 where a token may attend, the dtype's
    minimum elsewhere. The padding tail of a row starts at position 0, so it is a block of its own."""
    import torch

    dtype = dtype or torch.float32
    documents = document_ids(position_ids)
    same = documents[:, :, None] == documents[:, None, :]
    causal = torch.tril(torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool,
                                   device=position_ids.device))
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill_(~allowed,
                                                                                           torch.finfo(dtype).min)


def attention_inputs(position_ids, implementation: str, dtype=None) -> dict:
    """The keyword arguments that make a Hugging Face causal LM attend within samples only."""
    if implementation == "flash_attention_2":
        return {"position_ids": position_ids}
    if implementation == "flex_attention":
        return {"position_ids": position_ids, "attention_mask": document_block_mask(position_ids)}
    return {"position_ids": position_ids, "attention_mask": block_causal_mask(position_ids, dtype)}
