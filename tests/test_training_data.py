"""Tokenization with assistant-only labels, packing without cross-sample attention, the DeepSpeed
config, and the tiny model made from generated data (no Ray, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import write_samples

from agentflan_ray.aligning.align import align
from agentflan_ray.config import load_config
from agentflan_ray.jobs.generate import GenerateConfig
from agentflan_ray.jobs.train import TrainConfig
from agentflan_ray.reading.toolbench import parse_toolbench
from agentflan_ray.training.attention import block_causal_mask
from agentflan_ray.training.deepspeed_config import build_deepspeed_config, gradient_accumulation
from agentflan_ray.training.packing import pack, padding_share
from agentflan_ray.training.tiny_model import make_tiny_model
from agentflan_ray.training.tokenize import IGNORE, SkipSample, tokenize_sample

FIXTURES = Path(__file__).parent / "fixtures"
MESSAGES = [
    {"role": "system", "content": "You are helpful.", "loss": False, "capability": None},
    {"role": "user", "content": "Find the weather.", "loss": False, "capability": None},
    {"role": "assistant", "content": "I should call the weather tool.", "loss": True, "capability": "reasoning"},
    {"role": "user", "content": "Which tool?", "loss": False, "capability": None},
    {"role": "assistant", "content": "weather.get", "loss": False, "capability": "retrieval"},
    {"role": "user", "content": "{\"temp\": 3}", "loss": False, "capability": None},
    {"role": "assistant", "content": "It is 3 degrees.", "loss": True, "capability": "reasoning"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Sample shards written from the real fixtures, and a tiny model + tokenizer made from them."""
    root = tmp_path_factory.mktemp("tiny")
    config = load_config(GenerateConfig, None, ['inputs=[{format: sharegpt, path: x}]', "instruct_share=1.0"])
    rows = []
    for path in sorted((FIXTURES / "toolbench/answer").glob("*/*.json")):
        try:
            trajectory, _ = parse_toolbench(json.loads(path.read_text()), "toolbench", path.stem)
        except ValueError:
            continue
        rows += [s.to_row() for s in align(trajectory, config)]
    write_samples(root / "data", {"mixed": rows})
    model_dir = make_tiny_model(str(root / "data"), str(root / "model"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir), rows


def labelled_text(tokenizer, tokenized) -> str:
    return tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != IGNORE])


@pytest.mark.parametrize("template, end", [("agentflan", "\u0d3f\n "), ("llama2", " </s>"), ("chat_template", "</s>\n")])
def test_labels_cover_trained_assistant_turns_and_their_end_marker(tiny, template, end):
    tokenizer, _, _ = tiny
    tokenized = tokenize_sample(MESSAGES, tokenizer, template, max_len=4096)
    # Labels are the input ids themselves where trained (the model shifts them), -100 elsewhere.
    assert all(label in (IGNORE, token) for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True))
    text = labelled_text(tokenizer, tokenized)
    assert "I should call the weather tool." in text and "It is 3 degrees." in text
    assert text.rstrip().endswith(end.strip())
    for untrained in ("weather.get", "Find the weather", "You are helpful", "Which tool", "temp"):
        assert untrained not in text
    assert set(tokenized.capability_tokens) == {"reasoning"}


def test_samples_without_training_signal_or_too_long_are_skipped_with_a_reason(tiny):
    tokenizer, _, _ = tiny
    silent = [dict(m, loss=False) for m in MESSAGES]
    with pytest.raises(SkipSample, match="no_trained_assistant_turn"):
        tokenize_sample(silent, tokenizer, "agentflan", 4096)
    with pytest.raises(SkipSample, match="longer_than_max_seq_len"):
        tokenize_sample(MESSAGES, tokenizer, "agentflan", 8, overlong="drop")
    truncated = tokenize_sample(MESSAGES, tokenizer, "agentflan", 30, overlong="truncate")
    full = tokenize_sample(MESSAGES, tokenizer, "agentflan", 4096)
    assert truncated.truncated and not full.truncated
    assert (truncated.input_ids, truncated.labels) == (full.input_ids[:30], full.labels[:30])


def test_packing_restarts_positions_and_fills_rows():
    samples = [([1] * 5, [1] * 5), ([2] * 3, [2] * 3), ([3] * 4, [3] * 4), ([4] * 6, [4] * 6)]
    rows = list(pack(samples, max_seq_len=12, pad_id=0))
    assert [r.seq_lens for r in rows] == [[6, 5, 1], [4, 3, 5]]  # longest first; the last entry is padding
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0]
    assert rows[0].input_ids[:11] == [4] * 6 + [1] * 5
    assert rows[1].labels[7:] == [IGNORE] * 5 and rows[1].padding == 5
    assert padding_share(rows) == pytest.approx(6 / 24)
    with pytest.raises(ValueError, match="does not fit"):
        list(pack([([1] * 13, [1] * 13)], 12, 0))


def test_packed_loss_equals_unpacked_loss(tiny):
    tokenizer, model, rows = tiny
    model.eval()
    tokenized = [tokenize_sample(r["messages"], tokenizer, "chat_template", 256) for r in rows[:4]]
    samples = [(t.input_ids, t.labels) for t in tokenized]

    def summed_loss(input_ids, labels, **kwargs):
        logits = model(torch.tensor([input_ids]), **kwargs).logits[0, :-1]
        target = torch.tensor(labels[1:])
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")

    with torch.no_grad():
        separate = sum(summed_loss(ids, labels) for ids, labels in samples)
        length = sum(len(ids) for ids, _ in samples) + 7
        packed = next(pack(samples, max_seq_len=length, pad_id=tokenizer.pad_token_id))
        positions = torch.tensor([packed.position_ids])
        together = summed_loss(packed.input_ids, packed.labels, position_ids=positions,
                               attention_mask=block_causal_mask(positions))
    assert together.item() == pytest.approx(separate.item(), rel=1e-4)


def train_config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["data=d", "model=m", *overrides])


@pytest.mark.parametrize("world, accumulation", [(1, 16), (2, 8), (4, 4)])
def test_accumulation_keeps_the_global_batch(world, accumulation):
    config = build_deepspeed_config(train_config("global_batch=64", "micro_batch=4", "zero_stage=3",
                                                 "num_workers=1"), world, total_steps=100)
    assert config["gradient_accumulation_steps"] == accumulation
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="not a multiple"):
        gradient_accumulation(64, 3, world)


def test_deepspeed_config_is_built_once_from_the_train_config():
    """What deepspeed.initialize gets: bf16 and PyTorch's fused AdamW on GPU (no JIT-built op),
    fp32 and PyTorch's AdamW on CPU, DeepSpeed's CPUAdam when the optimizer is offloaded, the
    universal-checkpoint switch when asked; nothing is patched in afterwards."""
    gpu = build_deepspeed_config(train_config("use_gpu=true", "lr=0.001", "weight_decay=0.1",
                                              "gradient_clipping=0.5"), 2, total_steps=200)
    assert gpu["bf16"] == {"enabled": True} and gpu["gradient_clipping"] == 0.5
    assert gpu["optimizer"] == {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-8,
                                                            "weight_decay": 0.1, "torch_adam": True, "fused": True}}
    assert gpu["scheduler"]["params"]["warmup_num_steps"] == 6 and "checkpoint" not in gpu
    cpu = build_deepspeed_config(train_config(), 2, total_steps=10, load_universal=True)
    assert cpu["bf16"] == {"enabled": False} and cpu["checkpoint"] == {"load_universal": True}
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in cpu["optimizer"]["params"]
    offload = build_deepspeed_config(train_config("use_gpu=true", "offload_optimizer=true"), 2, total_steps=10)
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeedCPUAdam
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    forced = build_deepspeed_config(train_config("offload_optimizer=true", "optimizer=torch"), 2, total_steps=10)
    assert forced["optimizer"]["params"]["torch_adam"] is True and forced["zero_force_ds_cpu_optimizer"] is False
    deepspeed_adam = build_deepspeed_config(train_config("use_gpu=true", "optimizer=deepspeed"), 2, total_steps=10)
    assert "torch_adam" not in deepspeed_adam["optimizer"]["params"]


def test_tiny_tokenizer_round_trips_the_data_and_keeps_markers_whole(tiny):
    """The tokenizer is trained on the samples: their text comes back exactly (byte-level BPE, any
    script) in fewer tokens than characters, and the markers the templates rely on are one token each,
    the turn end being the eos token that generation stops at."""
    tokenizer, _, rows = tiny
    texts = [m["content"] for r in rows for m in r["messages"]]
    for text in [*texts, "Ünïcødé → 東京 🙂"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert len(tokenizer.encode("".join(texts), add_special_tokens=False)) < 0.5 * len("".join(texts))
    for marker in ("<s>", "</s>", "<pad>", "<|Human|>", "<|Assistant|>", "\u0d46", "\u0d3f"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    assert tokenizer.encode("</s>", add_special_tokens=False) == [tokenizer.eos_token_id]


def test_tiny_model_starts_untrained(tiny):
    """Random weights over the tokenizer's whole vocabulary: the loss on real text is about
    ln(vocabulary), i.e. every token about equally likely."""
    import math

    tokenizer, model, rows = tiny
    ids = tokenizer(rows[0]["messages"][-1]["content"], return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss == pytest.approx(math.log(len(tokenizer)), rel=0.02)


def test_a_batch_with_no_trainable_sample_keeps_its_counts(tiny):
    """Every sample of the batch is skipped: one count-only row (no tokens) carries the reasons."""
    from agentflan_ray.training.data import TokenizeAndPack

    silent = [dict(m, loss=False) for m in MESSAGES]
    pack_fn = TokenizeAndPack(tiny[0].name_or_path, "chat_template", 64, "drop")
    out = pack_fn({"messages": [silent, MESSAGES[:2]]})
    assert out["real_tokens"].tolist() == [0] and len(out["input_ids"][0]) == 0
    assert json.loads(out["stats"][0])["skipped"] == {"no_trained_assistant_turn": 2}


def test_prepared_rows_are_numbered_blocks_of_one_micro_batch(ray_session, tiny, tmp_path):
    """Shuffled by a seed, counted, and cut into blocks of micro_batch rows numbered 0..n-1, the
    same on every run."""
    from agentflan_ray.jobs.train import TrainConfig
    from agentflan_ray.training.data import prepare_dataset

    data = Path(tiny[0].name_or_path).parent / "data"
    config = load_config(TrainConfig, None, [f"data={data}", f"model={tiny[0].name_or_path}", "max_seq_len=512",
                                             "micro_batch=2", "global_batch=4", "num_workers=2"])
    dataset, report = prepare_dataset(config)
    assert report["samples"] == len(tiny[2]) == report["packed"] + sum(report["skipped"].values())
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    assert [len(b["row"]) for b in batches[:-1]] == [2] * (len(batches) - 1)
    assert [int(r) for b in batches for r in b["row"]] == list(range(report["rows"]))
    real = sum(int(t) for b in batches for t in b["real_tokens"])
    assert real == report["tokens"] - report["padding"]
    again, _ = prepare_dataset(config)
    first_rows = [b["input_ids"][0].tolist() for b in batches]
    assert [b["input_ids"][0].tolist() for b in again.iter_batches(batch_size=None, batch_format="numpy")] == first_rows


def test_packing_depends_on_the_samples_not_on_how_they_are_stored(ray_session, tiny, tmp_path):
    """1,500 samples in 1 file and the same samples in 7 files pack into the same rows: packing groups
    come from the samples' keys, not from Ray's blocks (a sort's blocks follow randomly sampled
    boundaries, which once made every run pack differently and a resumed run see other rows)."""
    import random

    from agentflan_ray.jobs.train import TrainConfig
    from agentflan_ray.training.data import prepare_dataset

    rng = random.Random(0)
    rows = [{"id": f"s{i}", "source": "synthetic", "source_id": f"s{i}", "stream": "general", "tools": "[]",
             "messages": [dict(MESSAGES[1], content=f"Question {i}?"),
                          dict(MESSAGES[2], content=" ".join(["word"] * rng.randint(3, 120)))]}
            for i in range(1500)]
    layouts = {"one_file": {"general": rows}, "seven_files": {f"s{i}": rows[i::7] for i in range(7)}}
    packed = {}
    for name, streams in layouts.items():
        write_samples(tmp_path / name, streams)
        config = load_config(TrainConfig, None, [f"data={tmp_path / name}", f"model={tiny[0].name_or_path}",
                                                 "max_seq_len=256", "num_workers=1", "global_batch=4"])
        dataset, report = prepare_dataset(config)
        assert report["samples"] == 1500 and report["rows"] > 100
        packed[name] = [r.tolist() for b in dataset.iter_batches(batch_size=None, batch_format="numpy")
                        for r in b["input_ids"]]
    assert packed["one_file"] == packed["seven_files"]


def test_flops_per_token_counts_the_model_parameters():
    """6 x the parameters a token passes through (all but the input embedding) + the attention term."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentflan_ray.training.metrics import flops_per_token, peak_flops

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    assert flops_per_token(config, 512) == 6 * matrices + 12 * 3 * 128 * 512
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("cpu") == 0.0


def test_tensorboard_events_reach_storage_and_leave_no_local_copy(tmp_path, monkeypatch):
    import tempfile

    import pyarrow.fs

    from agentflan_ray.training.metrics import TensorBoard

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "local"))
    (tmp_path / "local").mkdir()
    board = TensorBoard(str(tmp_path / "run" / "tensorboard"), pyarrow.fs.LocalFileSystem())
    board.scalars({"loss": 1.5, "step_name": "x", "done": True}, step=1)
    board.close()
    assert [p.name.startswith("events.out.tfevents.") for p in (tmp_path / "run" / "tensorboard").iterdir()] == [True]
    assert not list((tmp_path / "local").iterdir())


def test_local_paths_become_absolute_and_a_missing_model_fails_early(tmp_path, monkeypatch):
    """Ray Train workers do not share the driver's working directory; a wrong model path fails
    before any worker starts (not once per worker and retry)."""
    from agentflan_ray.jobs.train import TrainConfig, absolute_paths
    from agentflan_ray.jobs.train import run as run_train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    config = load_config(TrainConfig, None, ["data=./out/d", "model=./tiny", "export_dir=exp",
                                             "storage_path=s3://bucket/ckpt"])
    fixed = absolute_paths(config)
    assert (fixed.data, fixed.model, fixed.export_dir) == (str(tmp_path / "out/d"), str(tmp_path / "tiny"),
                                                           str(tmp_path / "exp"))
    assert fixed.storage_path == "s3://bucket/ckpt"
    assert absolute_paths(load_config(TrainConfig, None, ["data=./d", "model=meta-llama/Llama-2-7b-chat-hf"])
                          ).model == "meta-llama/Llama-2-7b-chat-hf"
    with pytest.raises(FileNotFoundError, match="model: cannot load"):
        run_train(config, log=lambda *_: None)
