"""The GPU training path, on CPU: which attention kernel and fused kernels a worker selects, the
FlexAttention block mask against the exact mask, and `bench/gpu_check.sh --dry-run` end to end."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, demo_overrides
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from agentflan_ray.training.attention import (
    attention_inputs,
    block_causal_mask,
    document_block_mask,
    document_mask_mod,
    select_attention,
)
from agentflan_ray.training.engine import select_fused_kernels


@pytest.mark.parametrize("requested, on_gpu, flash, flex, chosen", [
    ("auto", False, True, True, "sdpa"),  # CPU: the exact mask, whatever is installed
    ("auto", True, True, True, "flash_attention_2"),
    ("auto", True, False, True, "flex_attention"),  # the GPU machine without flash-attn
    ("auto", True, False, False, "sdpa"),  # an old PyTorch: the exact mask on GPU too
    ("flex_attention", False, False, True, "flex_attention"),  # asked for: taken as asked
    ("eager", True, True, True, "eager"),
])
def test_attention_selection(requested, on_gpu, flash, flex, chosen):
    assert select_attention(requested, on_gpu, flash_available=flash, flex_available=flex) == chosen


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention: must be auto or one of"):
        select_attention("flash", True)


LIGER_TYPES = {"llama", "mistral", "qwen2"}


def test_fused_kernel_selection():
    def select(requested, on_gpu=True, zero=2, model="llama", installed=True):
        return select_fused_kernels(requested, on_gpu, zero, model, installed=installed, supported=LIGER_TYPES)

    zero2 = select("auto")
    assert zero2 == {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                     "cross_entropy": False}
    # ZeRO-3 partitions the LM head's weight, which the fused linear cross-entropy reads directly.
    zero3 = select("auto", zero=3)
    assert zero3["fused_linear_cross_entropy"] is False and zero3["cross_entropy"] is True
    assert select("none") is None
    assert select("auto", on_gpu=False) is None  # Triton kernels: GPU only
    assert select("auto", installed=False) is None
    assert select("auto", model="gpt2") is None  # no Liger kernels for it: the model's own modules
    with pytest.raises(RuntimeError, match="needs the liger-kernel package"):
        select("liger", installed=False)
    with pytest.raises(RuntimeError, match="needs GPU workers"):
        select("liger", on_gpu=False)
    with pytest.raises(RuntimeError, match="no kernels for model type 'gpt2'"):
        select("liger", model="gpt2")


def packed_positions(lengths_per_row: list[list[int]], length: int) -> torch.Tensor:
    """Position ids of rows packed with samples of these lengths, the rest padding (packing.py)."""
    rows = []
    for lengths in lengths_per_row:
        positions = [p for n in lengths for p in range(n)]
        rows.append(positions + list(range(length - len(positions))))
    return torch.tensor(rows)


CASES = {
    "several_samples_and_padding": ([[5, 3, 4], [7, 1, 1, 2]], 16),
    "one_sample_filling_the_row": ([[16], [16]], 16),
    "single_token_samples": ([[1] * 10, [2, 1, 3]], 12),
    "length_not_a_multiple_of_the_block": ([[37, 50, 13], [99]], 131),
    "random": ([[random.Random(i).randint(1, 60) for _ in range(4)] for i in range(3)], 300),
}


@pytest.mark.parametrize("case", CASES)
def test_block_mask_predicate_equals_exact_mask(case):
    lengths, length = CASES[case]
    positions = packed_positions(lengths, length)
    exact = block_causal_mask(positions) == 0
    dense = create_mask(document_mask_mod(positions), len(lengths), 1, length, length, device="cpu")
    assert torch.equal(dense, exact)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_flex_attention_with_the_block_mask_equals_the_exact_mask(case, block_size):
    """The BlockMask (which blocks to skip, which to mask partially) gives the exact mask's attention;
    FlexAttention runs uncompiled on CPU, so this checks the mask, not the GPU kernel."""
    lengths, length = CASES[case]
    positions = packed_positions(lengths, length)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(len(lengths), 4, length, 16, generator=generator)
    k, v = (torch.randn(len(lengths), 2, length, 16, generator=generator) for _ in range(2))
    block_mask = document_block_mask(positions, block_size=block_size)
    out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(positions) == 0,
                                                                 enable_gqa=True)
    assert torch.allclose(out, reference, atol=1e-5)


def test_the_block_mask_skips_blocks_outside_every_sample():
    """Four samples of 64 in a row of 256 with blocks of 32: each sample's lower triangle of 2 x 2
    blocks is computed, 12 blocks in all, not the 36 of a causal mask over the whole row."""
    positions = packed_positions([[64, 64, 64, 64]], 256)
    block_mask = document_block_mask(positions, block_size=32)
    computed = int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
    assert computed == 4 * 3
    causal = document_block_mask(packed_positions([[256]], 256), block_size=32)
    assert int(causal.kv_num_blocks.sum() + causal.full_kv_num_blocks.sum()) == 8 * 9 // 2


def test_attention_inputs_per_implementation():
    positions = packed_positions([[3, 2]], 6)
    assert set(attention_inputs(positions, "flash_attention_2")) == {"position_ids"}
    flex = attention_inputs(positions, "flex_attention")
    assert isinstance(flex["attention_mask"], BlockMask)
    exact = attention_inputs(positions, "sdpa", torch.bfloat16)["attention_mask"]
    assert exact.shape == (1, 1, 6, 6) and exact.dtype == torch.bfloat16
    assert exact[0, 0, 3, 2].item() == torch.finfo(torch.bfloat16).min and exact[0, 0, 4, 3].item() == 0


@pytest.mark.slow
def test_gpu_check_dry_run(ray_session, sample_data, tmp_path):
    """`bench/gpu_check.sh --dry-run`: every step of the GPU check on CPU with a tiny model, its
    correctness checks passing, its figures printed, the Ray Train run on this session's Ray."""
    from agentflan_ray.config import load_config
    from agentflan_ray.jobs.generate import GenerateConfig
    from agentflan_ray.jobs.generate import run as generate

    demo = tmp_path / "demo"
    generate(load_config(GenerateConfig, None, demo_overrides(sample_data, demo)), log=lambda *_: None)
    inputs = tmp_path / "inputs"
    subprocess.run([sys.executable, "bench/gpu_check.py", "prepare", "--inputs", str(inputs), "--demo", str(demo)],
                   cwd=REPO, check=True, capture_output=True)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--inputs", str(inputs), "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--steps", "3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert records == [json.loads(line) for line in (tmp_path / "out/gpu_check.jsonl").read_text().splitlines()]
    checks = {(r["check"], r.get("path")): r["pass"] for r in records if r["part"] == "correctness"}
    assert checks == {("block_mask_equals_exact_mask", None): True,
                      ("packed_equals_unpacked", "exact_mask_fp32"): True,
                      ("packed_equals_unpacked", "sdpa"): True,
                      ("packed_equals_unpacked", "flex_attention"): True,
                      ("flex_attention_logits_equal_exact_mask", None): True}
    bare = next(r for r in records if r.get("loop") == "bare_deepspeed")
    assert bare["tokens_per_s"] > 0 and bare["timed_steps"] == 2 and bare["attention"] == "sdpa"
    ray_run = next(r for r in records if r.get("loop") == "ray_train")
    assert ray_run["steps"] == 3 and ray_run["rows_out_of_order"] == 0 and ray_run["tokens_per_s"] > 0
    overhead = next(r for r in records if r["part"] == "ray_over_bare")
    assert overhead["same_rows"] is True and overhead["ratio"] > 0
    assert any(r["part"] == "profile" for r in records)
    evals = {r["batch"]: r for r in records if r["part"] == "eval"}  # the eval HF backend, same model
    assert sorted(evals) == [1, 4] and all(r["cases_per_s"] > 0 for r in evals.values())
    assert evals[4]["same_replies_as_one_at_a_time"] == evals[4]["cases"] == 16
    assert records[-1]["part"] == "summary" and records[-1]["failures"] == 0
