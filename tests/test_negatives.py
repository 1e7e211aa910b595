"""The negatives job: every answer check, the material, and the job on the real records against the
simulator with corrupted answers (nothing unsafe written, every case accounted for, the Agent-H set
held out by query, near-duplicate and tool list, byte-identical rebuilds)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, SIM_KEY

from agentflan_ray.cli import main
from agentflan_ray.config import load_config
from agentflan_ray.jobs.negatives import NegativesConfig
from agentflan_ray.jobs.negatives import run as run_negatives
from agentflan_ray.negatives.cases import catalog_tool_lists
from agentflan_ray.negatives.prompts import answer_problem
from agentflan_ray.negatives.tasks import NO_TOOLS_SYSTEM

TOOLS = [{"name": "weather.get_forecast_for_weather", "description": "Forecast for a city."},
         {"name": "AirbnbSearch.search_property_by_place", "description": "Search Airbnb properties."}]


@pytest.mark.parametrize(("text", "reason"), [
    ("I can't check live weather, but Paris in May is usually mild; a weather site will have today's forecast.", ""),
    ("The forecast tool isn't meant for recipes, so here is a simple one: boil the pasta for 9 minutes.", ""),
    ("  ", "empty"),
    ("Thought: I need the forecast.\nAction: get_forecast_for_weather\nAction Input: {\"city\": \"Paris\"}",
     "call_syntax"),
    ('```json\n{"name": "get_forecast_for_weather", "arguments": {"city": "Paris"}}\n```', "call_syntax"),
    ('{"name": "search_property_by_place", "arguments": {"place": "Rome"}}', "call_syntax"),
    ("weather.get_forecast_for_weather(city='Paris')", "call_syntax"),
    ("goal: find the forecast\nname: get_forecast_for_weather\nargs: {\"city\": \"Paris\"}", "call_syntax"),
    ('{"tool_calls": [{"type": "function", "function": {"name": "x"}}]}', "call_syntax"),
    ("<tool_call>{\"name\": \"x\"}</tool_call>", "call_syntax"),
    ("Sure, I'll call get_forecast_for_weather to find out.", "tool_as_action"),
    ("Let me use AirbnbSearch.search_property_by_place for that request.", "tool_as_action"),
    ("I have booked a table for two at 8 pm.", "claimed_action"),
    ("I've just sent the email to your manager.", "claimed_action"),
    ("Your reservation has been confirmed.", "claimed_action"),
])
def test_each_answer_check_names_its_reason(text, reason):
    assert answer_problem(text, TOOLS).split(":", 1)[0] == reason


def test_teval_catalog_becomes_tool_lists():
    lists = catalog_tool_lists(json.loads((FIXTURES / "teval/api_descrip.json").read_text()))
    assert len(lists) == 15 and all(t["source"] == "teval" for t in lists)
    first = lists[0]["tools"][0]
    assert first["name"] == "AirbnbSearch.search_property_by_place"
    assert first["parameters"]["required"] == ["place"]
    assert catalog_tool_lists([{"name": "x"}, "junk", {"api_list": "no"}]) == []


def overrides(data: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        f'inputs=[{{format: toolbench, path: "{data}/toolbench/**/*.json"}}, '
        f'{{format: agentinstruct, path: "{data}/agentinstruct/*.json"}}, '
        f'{{format: sharegpt, path: "{data}/sharegpt/*.json"}}]',
        f'tool_catalogs=["{data}/teval/api_descrip.json"]', f"output={out}", "progress=false",
        "count=200", "agent_h_count=100", "positives=2", f"llm.base_url={url}", "llm.model=sim-gpt-4",
        "llm.backoff_initial_s=0.05", "llm.backoff_max_s=1", "llm.concurrency=16", "llm.batch_size=32", *extra,
    ]


def run(args: list[str]) -> dict:
    return run_negatives(load_config(NegativesConfig, None, args), log=lambda *_: None)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "llm_cache" not in p.parts}


def test_negatives_on_the_real_records_with_corrupted_answers(ray_session, simulator, sample_data, tmp_path):
    from agentflan_ray.negatives.dedupe import near_duplicate_of, normalize

    server, url = simulator(latency_s=0.01, corrupt=0.3)
    out = tmp_path / "out"
    manifest = run(overrides(sample_data, out, url))

    counts = manifest["counts"]
    cases = counts["per_source"]["cases"]
    assert cases["read"] == 200 and cases["read"] == cases["written"] + cases["quarantined"] + cases["dead_lettered"]
    assert counts["read"] == counts["written"] + counts["quarantined"] + counts["dead_lettered"]
    assert sum(v for k, v in server.stats()["faults"].items() if k.startswith("corrupt_")) >= 10

    rows = pq.read_table(out / "negative").to_pylist()
    assert len(rows) == cases["written"] >= 190
    for row in rows:  # nothing unsafe got through
        answer = row["messages"][-1]
        assert answer["role"] == "assistant" and answer["loss"] and answer["content"].strip()
        assert answer_problem(answer["content"], json.loads(row["tools"])) == "", answer["content"]
    metas = [json.loads(r["meta"]) for r in rows]
    no_tools = [r for r, m in zip(rows, metas, strict=True) if m["scenario"] == "no_tools"]
    irrelevant = [r for r, m in zip(rows, metas, strict=True) if m["scenario"] == "irrelevant_tools"]
    assert all(r["tools"] == "[]" and r["messages"][0]["content"] == NO_TOOLS_SYSTEM for r in no_tools)
    assert all(json.loads(r["tools"]) and "You have access to" in r["messages"][0]["content"] for r in irrelevant)
    assert abs(len(no_tools) / len(rows) - 0.5) <= 0.02
    assert {m["query_source"] for m in metas} >= {"toolbench", "sharegpt", "llm"}
    assert {m["tool_source"] for m in metas} >= {"toolbench", "teval"}

    held = [json.loads(line) for line in (out / "agent_h/part-00000.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in held} == {"react", "general"} and len(held) == 2 * (100 + 2)
    assert sum(r["expect"] != "no_call" for r in held) == 2 * 2  # positive controls, both protocols
    held_queries = sorted({r["messages"][1]["content"] for r in held})
    train_queries = [r["messages"][1]["content"] for r in rows]
    assert not {normalize(q) for q in held_queries} & {normalize(q) for q in train_queries}
    assert not near_duplicate_of(held_queries, train_queries, threshold=0.8)
    held_lists = {json.dumps(sorted(t["function"]["name"] for t in r["tools"])) for r in held if r["tools"]}
    train_lists = {json.dumps(sorted(t["name"] for t in json.loads(r["tools"]))) for r in irrelevant}
    assert held_lists and not held_lists & train_lists

    # Rebuilding with the same seed: the same bytes, and no request.
    answered, before = server.stats()["answered"], digests(out)
    del before["manifest.json"]  # its timing and this run's usage differ
    again = run(overrides(sample_data, out, url))
    assert server.stats()["answered"] == answered and again["llm"]["requests"] == 0
    after = digests(out)
    del after["manifest.json"]
    assert after == before


def test_an_invalid_key_stops_the_job_before_ray_starts(simulator, sample_data, tmp_path, monkeypatch, capsys):
    _, url = simulator()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-000000000000")
    started = time.monotonic()
    assert main(["negatives", *overrides(sample_data, tmp_path / "out", url)]) == 2
    assert time.monotonic() - started < 10 and "OPENAI_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_key_appears_in_no_output(ray_session, simulator, sample_data, tmp_path):
    _, url = simulator(latency_s=0.01)
    run(overrides(sample_data, tmp_path / "out", url, "count=20", "agent_h_count=10"))
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SIM_KEY.encode() not in path.read_bytes(), path


def test_generate_puts_the_negative_stream_into_the_mix(ray_session, simulator, sample_data, tmp_path):
    from conftest import demo_overrides

    from agentflan_ray.jobs.generate import GenerateConfig
    from agentflan_ray.jobs.generate import run as generate
    from agentflan_ray.writing.manifest import sample_shards

    _, url = simulator(latency_s=0.01, corrupt=0.2)
    out = tmp_path / "out"
    config = load_config(GenerateConfig, None, [
        *demo_overrides(sample_data, out), "negatives.count=40", f'negatives.tool_catalogs=["{sample_data}/teval/api_descrip.json"]',
        f"llm.base_url={url}", "llm.model=sim-gpt-4", "llm.backoff_initial_s=0.05"])
    manifest = generate(config, log=lambda *_: None)
    negatives = manifest["counts"]["per_source"]["negatives"]
    assert negatives["read"] == 40 and negatives["written"] == manifest["samples"]["per_stream"]["negative"] >= 36
    assert negatives["read"] == negatives["written"] + negatives["quarantined"] + negatives["dead_lettered"]
    assert manifest["counts"]["per_source"]["toolbench"]["read"] == 10  # the records are counted once
    assert manifest["rewrite"] == {"mode": "template"} and manifest["negatives"]["llm"]["requests"] > 0
    rows = pq.read_table(out / "negative").to_pylist()
    assert {json.loads(r["meta"])["scenario"] for r in rows} == {"no_tools", "irrelevant_tools"}
    assert any(str(p).endswith(".parquet") and "/negative/" in str(p) for p in sample_shards(str(out), config.storage))


def test_estimate_calls_nothing(simulator, sample_data, tmp_path, monkeypatch, capsys):
    server, url = simulator()
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(["negatives", *overrides(sample_data, tmp_path / "out", url), "--estimate"]) == 0
    printed = capsys.readouterr().out
    assert "200 answers" in printed and "no API call made" in printed
    assert server.stats()["answered"] == 0 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_rerun_after_a_kill_repeats_no_answered_request(ray_session, simulator, sample_data, tmp_path):
    import os
    import subprocess
    import sys

    import ray
    from conftest import REPO, kill_and_settle, wait_until

    server, url = simulator(latency_s=0.3)
    out = tmp_path / "out"
    args = overrides(sample_data, out, url, "count=40", "agent_h_count=10", "llm.concurrency=2", "llm.actors=1")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, "-m", "agentflan_ray.cli", "negatives", *args], env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: server.stats()["answered"] >= 12 or job.poll() is not None, 120, "12 answers")
    answered_before, cached = kill_and_settle(job, server, out)
    assert answered_before >= 12 and cached >= 10 and not (out / "manifest.json").exists()

    manifest = run(args)
    assert manifest["llm"]["cached"] >= cached and manifest["counts"]["per_source"]["cases"]["written"] == 40
    assert server.stats()["repeated_answers"] == answered_before - cached


def test_a_missing_tool_catalog_stops_generate_before_ray_starts(sample_data, tmp_path, capsys):
    from conftest import demo_overrides

    args = [*demo_overrides(sample_data, tmp_path / "out"), "negatives.count=5",
            f'negatives.tool_catalogs=["{tmp_path}/no-such-catalog.json"]']
    assert main(["generate", *args]) == 2
    assert "no-such-catalog.json" in capsys.readouterr().err and not (tmp_path / "out").exists()
