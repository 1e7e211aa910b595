"""The eval job on a model the `train` job trained and exported, through the Hugging Face backend on
CPU: a complete report for the bundled sets with broken rows quarantined, and replies that are
exactly Hugging Face's own greedy ``generate`` one case at a time, though the backend batches them,
runs a shared prompt prefix once and drops a row from its batch when the row ends."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_data

from agentflan_ray.config import load_config
from agentflan_ray.evaluating.backends import HFGenerate, prefix_groups
from agentflan_ray.jobs.eval import EvalConfig, succeeded
from agentflan_ray.jobs.eval import run as run_eval
from agentflan_ray.jobs.train import TrainConfig
from agentflan_ray.jobs.train import run as run_train
from agentflan_ray.storage import StorageConfig

REPO = Path(__file__).resolve().parent.parent
BUNDLED = [REPO / f"jobs/configs/eval_demo_{name}.jsonl" for name in ("agent_h", "tool_call", "instruct")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("eval_hf"))


@pytest.fixture(scope="module")
def exported(ray_session, tiny) -> Path:
    """Eight steps of the train job on one worker, exported: enough that the model ends most replies
    at once with its end marker (it learnt to answer briefly) and repeats one token in the others."""
    export = tiny / "export"
    result = run_train(load_config(TrainConfig, None, [
        f"data={tiny / 'data'}", f"model={tiny / 'model'}", "max_seq_len=128", "global_batch=4", "micro_batch=1",
        "num_workers=1", "cpus_per_worker=1", "lr=0.01", "warmup_ratio=0.0", "overlong=drop", "max_steps=8",
        "checkpoint_every=8", "run_name=eval-hf", f"storage_path={tiny / 'ckpt'}", f"export_dir={export}",
    ]), log=lambda *_: None)
    assert result["metrics"]["step"] == 8 and (export / "config.json").exists()
    return export


def one_at_a_time(model: Path, cases: list[dict], max_new_tokens: int) -> dict[str, tuple[str, str]]:
    """``{id: (reply, finish_reason)}`` from transformers' ``generate``, greedy, one case at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, llm = AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model).eval()
    eos = llm.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    replies = {}
    for case in cases:
        new = continuation(model, case, max_new_tokens, tokenizer, llm)
        end = next((i for i, token in enumerate(new) if token in eos), None)  # the reply is what comes before it
        replies[case["id"]] = (tokenizer.decode(new[:end], skip_special_tokens=True), "length" if end is None else "stop")
    return replies


def continuation(model: Path, case: dict, max_new_tokens: int, tokenizer=None, llm=None) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
    llm = llm or AutoModelForCausalLM.from_pretrained(model).eval()
    prompt = tokenizer.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        return llm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()


def test_an_exported_model_gets_a_complete_report_with_one_at_a_time_replies(ray_session, exported, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{not json\n{"id": "x", "suite": "agent_h"}\n')
    out = tmp_path / "out"
    sets = ",".join(str(path) for path in [*BUNDLED, broken])
    manifest = run_eval(load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={out}", f"model={exported}",
                                                        "max_new_tokens=12", "batch_size=8", "progress=false"]),
                        log=lambda *_: None)

    cases = [json.loads(line) for path in BUNDLED for line in path.read_text().splitlines()]
    counts = manifest["counts"]
    assert (counts["read"], counts["written"], counts["quarantined"]) == (len(cases) + 2, len(cases), 2)
    assert succeeded(manifest) and (out / "manifest.json").exists()
    timing = manifest["llm"]
    assert 0 < timing["first_replies_s"] <= timing["generation_s"] <= manifest["seconds"]
    assert timing["cases_per_s_after_first"] > 0
    quarantined = pq.read_table(out / "quarantine").to_pylist()
    assert sorted(row["reason"] for row in quarantined) == ["missing_key", "not_json"]

    rows = {row["id"]: row for row in pq.read_table(out / "cases").to_pylist()}
    assert sorted(rows) == sorted(case["id"] for case in cases)
    assert {row["suite"] for row in rows.values()} == {"agent_h", "tool_call", "instruct"}
    assert {row["finish_reason"] for row in rows.values()} == {"stop", "length"}
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"backend": "model", "name": str(exported), "base_url": ""}
    assert report["generation"] == {"decoding": "greedy", "max_new_tokens": 12}
    assert [s["path"] for s in report["sets"]] == [str(path) for path in [*BUNDLED, broken]]
    assert all(len(s["sha256"]) == 64 for s in report["sets"])
    # The report's figures are the per-case rows' figures.
    for protocol, key in (("react", "H_ReAct"), ("general", "H_General")):
        negatives = [r for r in rows.values() if (r["suite"], r["protocol"], r["expect"]) == ("agent_h", protocol, "no_call")]
        assert report["scores"]["agent_h"][key] == pytest.approx(100 * sum(r["called"] for r in negatives) / len(negatives),
                                                                 abs=0.01)
    assert {"agent_h/react", "agent_h/general", "tool_call/general"} <= set(report["scores"]["groups"])
    markdown = (out / "report.md").read_text()
    assert str(exported) in markdown and "H_Score" in markdown and "89.1" in markdown

    # Batched in the job, the replies are those of generate one at a time (a sample across the sets).
    sample = cases[::6]
    expected = one_at_a_time(exported, sample, 12)
    assert {key: (rows[key]["reply"], rows[key]["finish_reason"]) for key in expected} == expected


def sharp_model(tiny: Path, target: Path) -> Path:
    """The tiny model's tokenizer with random weights ten times the usual scale, untied: unlike the
    trained model (which mostly ends at once or repeats one token), each reply is a different
    string of tokens, so a wrong position, mask or cache row changes it."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    shutil.copytree(tiny / "model", target)
    config = AutoConfig.from_pretrained(target)
    config.initializer_range, config.tie_word_embeddings = 0.5, False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def test_a_batch_gives_each_row_what_it_gives_alone(tiny, tmp_path):
    """One batch: four cases that share a long system prompt (run once as a prefix) and eight short
    ones (run together, right-padded). A second end marker in the generation config (as Llama 3's
    end-of-turn beside end-of-text), a token emitted some steps into one reply and never in another,
    so rows leave the batch at different steps while others run to the limit."""
    import pyarrow as pa

    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA

    agent_h = [json.loads(line) for line in BUNDLED[0].read_text().splitlines()]
    systems = [c["messages"][0]["content"] for c in agent_h]
    system = max((text for text in systems if systems.count(text) >= 4), key=len)  # tools: thousands of tokens
    cases = [c for c in agent_h if c["messages"][0]["content"] == system][:4]
    cases += [c for c in agent_h if c["id"].startswith("agent_h-no_tools-") and c["id"].endswith("/general")][:8]
    model = sharp_model(tiny, tmp_path / "model")
    config = json.loads((model / "generation_config.json").read_text())
    runs = [continuation(model, case, 12) for case in cases]
    marker = next((token for token in sorted({t for run in runs for t in run} - {config["eos_token_id"]})
                   if any(token in run[2:] and token not in run[:2] for run in runs)
                   and sum(token not in run and len(run) == 12 for run in runs) >= 2), None)
    assert marker is not None, f"no token ends one reply late and is absent from others: {runs}"
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [config["eos_token_id"], marker]}))

    generate = HFGenerate(str(model), StorageConfig(), 12)
    groups = prefix_groups([generate.tokenizer(generate.prompt(c["messages"]), add_special_tokens=False).input_ids
                            for c in cases])
    assert sorted(len(rows) for rows, shared in groups if shared > 1000) == [4] and groups[-1][1] == 0
    expected = one_at_a_time(model, cases, 12)
    assert {"stop", "length"} <= {finish for _, finish in expected.values()}
    rows = [{"id": c["id"], "messages": json.dumps(c["messages"]), "tools": ""} for c in cases]
    got = generate(pa.Table.from_pylist(rows, schema=CASE_ROW_SCHEMA)).to_pylist()
    assert {r["id"]: (r["reply"], r["finish_reason"]) for r in got} == expected


def test_rows_that_share_a_long_prefix_are_grouped_and_the_rest_run_together():
    tools = list(range(100, 140))  # a system prompt with its tools: 40 tokens
    prompts = [tools + [1, 2], [7, 8, 9], tools + [3], tools + [4, 5, 6], [7, 8, 10, 11, 12], tools + [1, 2]]
    groups = prefix_groups(prompts)
    assert groups == [([0, 5, 2, 3], 40), ([1, 4], 0)]  # [7, 8] is too short beside the rows' own parts
    # Each row keeps a token of its own: identical prompts share all but their last.
    assert prefix_groups([tools, tools]) == [([0, 1], 39)]
    assert prefix_groups([[5]]) == [([0], 0)]


def test_a_model_on_s3_is_copied_to_the_node_and_its_copy_removed_once_loaded(tiny, s3_server, s3_bucket, tmp_path,
                                                                              monkeypatch):
    """A 1B model is gigabytes: a copy per actor left in /tmp would fill a node's disk job by job."""
    import tempfile

    import boto3

    from agentflan_ray.evaluating.backends import local_model

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in (tiny / "model").iterdir():
        s3.upload_file(str(path), s3_bucket, f"models/tiny/{path.name}")
    uri = f"s3://{s3_bucket}/models/tiny"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temporary directory
    with local_model(uri, StorageConfig()) as path:
        assert Path(path).parent == tmp_path and (Path(path) / "config.json").exists()
    assert not list(tmp_path.iterdir())
    generate = HFGenerate(uri, StorageConfig(), 4)
    assert generate.model.config.hidden_size == 64 and not list(tmp_path.iterdir())
    with local_model(str(tiny / "model"), StorageConfig()) as path:
        assert path == str(tiny / "model")


@pytest.mark.parametrize("window", [64, 8192])
def test_a_sliding_window_model_gets_what_it_gets_alone(tiny, tmp_path, window):
    """Mistral-style layers that attend to the last ``window`` positions only: where the prompts are
    longer (64), pads inside the window would shift it, so each row runs alone; where all fits
    (8192), the batch runs as usual, the sliding layers' own count of positions kept right."""
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           max_position_embeddings=8192, initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    agent_h = [json.loads(line) for line in BUNDLED[0].read_text().splitlines()]
    systems = [c["messages"][0]["content"] for c in agent_h]
    system = max((text for text in systems if systems.count(text) >= 3), key=len)
    cases = [c for c in agent_h if c["messages"][0]["content"] == system][:3]
    cases += [c for c in agent_h if c["id"].startswith("agent_h-no_tools-")][:3]
    generate = HFGenerate(str(tmp_path / "mistral"), StorageConfig(), 10)
    assert generate.window == window
    rows = [{"id": c["id"], "messages": json.dumps(c["messages"]), "tools": ""} for c in cases]
    got = generate(pa.Table.from_pylist(rows, schema=CASE_ROW_SCHEMA)).to_pylist()
    assert {r["id"]: (r["reply"], r["finish_reason"]) for r in got} == one_at_a_time(tmp_path / "mistral", cases, 10)


def test_the_attention_window_comes_from_the_layer_types_or_the_sliding_window():
    from types import SimpleNamespace

    from transformers import MistralConfig, Qwen2Config

    from agentflan_ray.evaluating.backends import attention_window

    assert attention_window(MistralConfig(sliding_window=4096)) == 4096
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(Qwen2Config(sliding_window=4096, use_sliding_window=False)) is None
    assert attention_window(SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=512)) == 512
    assert attention_window(SimpleNamespace(layer_types=["full_attention"], sliding_window=512)) is None
    assert attention_window(SimpleNamespace(layer_types=["linear_attention", "full_attention"], sliding_window=None)) == 0
    assert attention_window(SimpleNamespace()) is None  # Llama: no window at all


def test_a_case_the_model_cannot_take_is_dead_lettered_and_its_batch_goes_on(tiny, tmp_path):
    """GPT-2-style learned positions stop at ``n_positions``: a longer prompt cannot run at all. Its
    batch falls back to one row at a time; that row gets a reason, the others their replies."""
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    short = [{"role": "user", "content": "Hi."}]
    cases = [{"id": "short-1", "messages": short}, {"id": "long", "messages": [{"role": "user", "content": "word " * 200}]},
             {"id": "short-2", "messages": [{"role": "user", "content": "Hello there."}]}]
    generate = HFGenerate(str(tmp_path / "gpt2"), StorageConfig(), 8)
    rows = [{"id": c["id"], "messages": json.dumps(c["messages"]), "tools": ""} for c in cases]
    got = {r["id"]: r for r in generate(pa.Table.from_pylist(rows, schema=CASE_ROW_SCHEMA)).to_pylist()}
    assert got["long"]["error"].startswith("context_length_exceeded: ") and got["long"]["reply"] == ""
    expected = one_at_a_time(tmp_path / "gpt2", [cases[0], cases[2]], 8)
    assert {key: (got[key]["reply"], got[key]["finish_reason"]) for key in expected} == expected
    assert got["short-1"]["error"] == got["short-2"]["error"] == ""


def test_a_template_that_refuses_system_turns_gets_them_folded_and_one_that_refuses_all_dead_letters(tiny, tmp_path):
    """Gemma's chat template raises on a system turn; every Agent-H case has one."""
    import shutil

    import pyarrow as pa
    from transformers import AutoTokenizer

    from agentflan_ray.evaluating.backends import CASE_ROW_SCHEMA

    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    for name, template in (("no-system", no_system), ("refuses-all", "{{ raise_exception('no chat here') }}")):
        shutil.copytree(tiny / "model", tmp_path / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
    case = json.loads(BUNDLED[0].read_text().splitlines()[0])
    assert case["messages"][0]["role"] == "system" and case["messages"][1]["role"] == "user"
    rows = pa.Table.from_pylist([{"id": "c", "messages": json.dumps(case["messages"]), "tools": ""}],
                                schema=CASE_ROW_SCHEMA)

    folded = HFGenerate(str(tmp_path / "no-system"), StorageConfig(), 4)
    prompt = folded.prompt(case["messages"])
    assert prompt.startswith(f"<|user|>\n{case['messages'][0]['content']}\n\n{case['messages'][1]['content']}</s>")
    assert folded(rows).to_pylist()[0]["error"] == ""

    refused = HFGenerate(str(tmp_path / "refuses-all"), StorageConfig(), 4)(rows).to_pylist()[0]
    assert refused["error"].startswith("template_failed: ") and "no chat here" in refused["error"]
