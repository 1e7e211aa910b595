"""Ray Train + DeepSpeed on CPU with two workers and a tiny model: ZeRO-2 and ZeRO-3 train, a
rerun resumes from the checkpoint, and the exported model loads and stops at its end marker."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from agentflan_ray.config import TrainConfig, load_config
from agentflan_ray.records import SAMPLE_SCHEMA
from agentflan_ray.training.tiny_model import make_tiny_model
from agentflan_ray.training.train import run_train

pytestmark = pytest.mark.slow
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    messages = [
        {"role": "system", "content": "You answer briefly.", "loss": False, "capability": None},
        {"role": "user", "content": "What is the capital of France?", "loss": False, "capability": None},
        {"role": "assistant", "content": ANSWER, "loss": True, "capability": "reasoning"},
    ]
    rows = [{"id": f"s{i}", "source": "synthetic", "source_id": f"s{i}", "stream": "general", "messages": messages,
             "tools": "[]"} for i in range(48)]
    rows.append({**rows[0], "id": "silent", "messages": [dict(m, loss=False) for m in messages]})
    (root / "data" / "general").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), root / "data/general/part-00000.parquet")
    (root / "data" / "empty").mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=SAMPLE_SCHEMA), root / "data/empty/part-00000.parquet")
    make_tiny_model(str(root / "data"), str(root / "model"), hidden=64, layers=2, vocab_size=300)
    return root


def config(root, *overrides):
    return load_config(TrainConfig, None, [
        f"data={root / 'data'}", f"model={root / 'model'}", "max_seq_len=128", "global_batch=4", "micro_batch=1",
        "num_workers=2", "cpus_per_worker=0.5", "lr=0.003", "warmup_ratio=0.0", f"storage_path={root / 'ckpt'}",
        *overrides,
    ])


def test_zero2_trains_resumes_and_exports(ray_session, tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = run_train(config(tiny_run, "zero_stage=2", "max_steps=12", "checkpoint_every=6", "run_name=z2"),
                      log=lambda *_: None)
    assert first["data"]["skipped"] == {"no_trained_assistant_turn": 1}
    assert first["metrics"]["step"] == 12 and first["metrics"]["resumed_from"] == 0

    export = tiny_run / "export"
    second = run_train(config(tiny_run, "zero_stage=2", "max_steps=24", "checkpoint_every=6", "run_name=z2",
                              f"export_dir={export}"), log=lambda *_: None)
    assert second["metrics"]["resumed_from"] == 12 and second["metrics"]["step"] == 24

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "model").eval()
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "You answer briefly."},
                                            {"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    target = tokenizer(prompt + ANSWER + "</s>", return_tensors="pt").input_ids
    labels = target.clone()
    labels[0, : ids.shape[1]] = -100  # the answer's loss only
    with torch.no_grad():
        assert model(target, labels=labels).loss < base(target, labels=labels).loss * 0.6
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert text.startswith(ANSWER) and out[0, -1].item() == tokenizer.eos_token_id, text


def test_zero3_trains(ray_session, tiny_run):
    result = run_train(config(tiny_run, "zero_stage=3", "max_steps=4", "checkpoint_every=4", "run_name=z3",
                              f"export_dir={tiny_run / 'export3'}"), log=lambda *_: None)
    assert result["metrics"]["step"] == 4
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tiny_run / "export3") is not None
