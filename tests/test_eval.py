"""The eval job: scripted replies through the simulator give exactly the rates they imply; a tiny
model runs through the Hugging Face backend on CPU; bad sets and a missing model are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from agentflan_ray.cli import main
from agentflan_ray.config import ConfigError, load_config
from agentflan_ray.jobs.eval import EvalConfig
from agentflan_ray.jobs.eval import estimate as estimate_eval
from agentflan_ray.jobs.eval import run as run_eval

REPO = Path(__file__).resolve().parent.parent

TOOLS = [{"type": "function", "function": {"name": "weather.get_forecast", "description": "Forecast for a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = 'Action: weather.get_forecast\nAction Input: {"city": "Paris"}'
PROSE = "I cannot book tables, but here is how you could find a good restaurant."


def case(i: int, protocol: str, reply: str, expect="no_call", suite: str = "agent_h") -> dict:
    return {"id": f"c{i}", "suite": suite, "protocol": protocol, "tools": TOOLS, "expect": expect,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": f"<<<ECHO>>>{reply}<<<END>>> (case {i})"}]}


def write_set(path: Path, rows: list, broken: bool = False) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if broken:
            f.write("{not json\n")
            f.write(json.dumps({"id": "x", "suite": "agent_h"}) + "\n")
    return path


def scripted_set(path: Path) -> Path:
    """react: 10 negatives, 3 answered with a call; general: 10 negatives, 1 with a call; 4 positives
    with the right call, 1 with the wrong arguments, 1 with no call."""
    rows = [case(i, "react", CALL if i < 3 else PROSE) for i in range(10)]
    rows += [case(10 + i, "general", CALL if i < 1 else PROSE) for i in range(10)]
    expect = {"name": "weather.get_forecast", "arguments": {"city": "Paris"}}
    rows += [case(20 + i, "general", CALL, expect, "tool_call") for i in range(4)]
    rows += [case(24, "general", CALL.replace("Paris", "Rome"), expect, "tool_call"),
             case(25, "general", PROSE, expect, "tool_call")]
    return write_set(path, rows, broken=True)


def test_scripted_replies_give_exactly_the_rates_they_imply(ray_session, simulator, tmp_path):
    _, url = simulator(latency_s=0.01)
    sets = scripted_set(tmp_path / "set.jsonl")
    out = tmp_path / "out"
    manifest = run_eval(load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={out}", f"endpoint={url}",
                                                        "model_name=sim-gpt-4", "progress=false"]), log=lambda *_: None)
    scores = manifest["scores"]
    assert scores["agent_h"] == {"H_ReAct": 30.0, "H_General": 10.0, "H_Score": 80.0}
    tool_call = scores["groups"]["tool_call/general"]
    assert (tool_call["call_rate"], tool_call["name_accuracy"], tool_call["argument_accuracy"]) == \
        (pytest.approx(100 * 5 / 6, abs=0.01), pytest.approx(100 * 5 / 6, abs=0.01), pytest.approx(100 * 4 / 6, abs=0.01))
    counts = manifest["counts"]
    assert counts["read"] == 28 and counts["written"] == 26 and counts["quarantined"] == 2
    rows = {r["id"]: r for r in pq.read_table(out / "cases").to_pylist()}
    assert rows["c0"]["called"] and rows["c0"]["rule"] == "react" and rows["c0"]["call_name"] == "weather.get_forecast"
    assert not rows["c5"]["called"] and rows["c5"]["correct"]
    report = json.loads((out / "report.json").read_text())
    assert report["sets"][0]["sha256"] and report["model"]["name"] == "sim-gpt-4"
    md = (out / "report.md").read_text()
    assert "H_Score" in md and "Agent-FLAN" in md and "89.1" in md

    # Compared with itself: every delta is zero.
    again = run_eval(load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={tmp_path / 'again'}", f"endpoint={url}",
                                                     "model_name=sim-gpt-4", "progress=false",
                                                     f"compare={out / 'report.json'}"]), log=lambda *_: None)
    assert again["scores"] == manifest["scores"]
    deltas = json.loads((tmp_path / "again/report.json").read_text())["compare"]["deltas"]
    assert deltas and all(v == 0 for group in deltas.values() for v in group.values())


FORECAST = {"name": "weather.get_forecast", "arguments": {"city": "Paris"}}
JSON_REPLY = json.dumps({"thought": "Paris.", "name": "weather.get_forecast", "args": {"city": "Paris"}})
GOAL_REPLY = 'goal: Paris.\nname: weather.get_forecast\nargs: {"city": "Paris"}'


def native_call(name: str, city: str) -> str:
    """A reply the simulator gives as a native tool call (as JSON text when no tools= came)."""
    return "<<<TOOL_CALL>>>" + json.dumps({"name": name, "arguments": {"city": city}})


def instruct(i: int, fmt: str, reply: str) -> dict:
    return {**case(i, fmt, reply, FORECAST, "instruct"), "format": fmt}


def tools_set(path: Path) -> Path:
    """instruct/json: 3 in JSON (one with the wrong city), 1 the right call in the goal protocol;
    instruct/goal: 2 right; tool_call/general: 3 native calls under the name sent (weather_get_forecast,
    read back as weather.get_forecast), 1 with the wrong city; agent_h/general: 2 prose."""
    rows = [instruct(0, "json", JSON_REPLY), instruct(1, "json", JSON_REPLY),
            instruct(2, "json", JSON_REPLY.replace("Paris", "Rome")), instruct(3, "json", GOAL_REPLY),
            instruct(4, "goal", GOAL_REPLY), instruct(5, "goal", GOAL_REPLY)]
    rows += [case(10 + i, "general", native_call("weather_get_forecast", "Paris"), FORECAST, "tool_call")
             for i in range(3)]
    rows += [case(13, "general", native_call("weather_get_forecast", "Rome"), FORECAST, "tool_call"),
             case(14, "general", PROSE), case(15, "general", PROSE)]
    return write_set(path, rows)


def eval_config(sets: Path, out: Path, url: str, *more: str) -> EvalConfig:
    return load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={out}", f"endpoint={url}",
                                          "model_name=sim-gpt-4", "progress=false", *more])


def test_instruct_format_hits_and_native_tool_calls_through_the_simulator(ray_session, simulator, tmp_path):
    server, url = simulator(latency_s=0.01)
    sets, out = tools_set(tmp_path / "set.jsonl"), tmp_path / "out"
    config = eval_config(sets, out, url)
    estimate = estimate_eval(eval_config(sets, out, url, "native_tools=on"), log=lambda *_: None)
    manifest = run_eval(config, log=lambda *_: None)
    assert config.native_tools == "on"  # auto: the simulator took tools= in preflight
    groups = manifest["scores"]["groups"]
    rates = ("format_hit", "name_accuracy", "argument_accuracy", "correct")
    assert [groups["instruct/json"][k] for k in rates] == [75.0, 75.0, 50.0, 50.0]
    assert [groups["instruct/goal"][k] for k in rates] == [100.0, 100.0, 100.0, 100.0]
    assert [groups["tool_call/general"][k] for k in ("call_rate", "name_accuracy", "argument_accuracy")] == \
        [100.0, 100.0, 75.0]
    assert groups["tool_call/general"]["format_hit"] is None and groups["agent_h/general"]["hallucination"] == 0.0
    assert manifest["native_tools"] == {"asked": 6, "fallback": 0}
    # The estimate counts prompt tokens as the simulator does, tools of general cases included.
    assert (estimate["cases"], estimate["requests"]) == (12, 12)
    assert estimate["prompt_tokens"] == manifest["llm"]["prompt_tokens"]
    rows = {r["id"]: r for r in pq.read_table(out / "cases").to_pylist()}
    native = rows["c10"]
    assert (native["rule"], native["call_name"], native["native"], native["reply"]) == \
        ("tool_calls", "weather.get_forecast", "on", "")
    assert json.loads(native["reply_tool_calls"])[0]["function"]["name"] == "weather.get_forecast"
    assert rows["c3"]["format_hit"] is False and rows["c3"]["called"] and rows["c3"]["rule"] == "goal_protocol"
    assert not rows["c3"]["name_right"] and not rows["c3"]["correct"]
    assert rows["c0"]["format_hit"] is True and rows["c0"]["correct"] and rows["c14"]["format_hit"] is None
    assert "format hit %" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["generation"]["native_tools"] == "on"

    # A rerun pays nothing: the native calls come back from the cache.
    answered = server.stats()["answered"]
    again = run_eval(eval_config(sets, out, url, "native_tools=on"), log=lambda *_: None)
    assert again["llm"]["requests"] == 0 and again["scores"] == manifest["scores"]
    assert server.stats()["answered"] == answered
    assert pq.read_table(out / "cases").to_pylist() == list(rows.values())


def test_an_endpoint_that_rejects_tools_is_asked_in_text(ray_session, simulator, tmp_path):
    server, url = simulator(latency_s=0.01, reject_tools=True)
    sets = tools_set(tmp_path / "set.jsonl")
    auto = eval_config(sets, tmp_path / "auto", url)
    manifest = run_eval(auto, log=lambda *_: None)
    assert auto.native_tools == "off" and manifest["native_tools"] == {"asked": 0, "fallback": 0}
    assert server.stats()["status"]["400"] == 1  # the preflight's probe
    logged = []
    forced = run_eval(eval_config(sets, tmp_path / "on", url, "native_tools=on"), log=logged.append)
    assert forced["native_tools"] == {"asked": 6, "fallback": 6}  # each general case: 400, then as text
    assert any("rejected tools= (HTTP 400) for 6 cases" in line for line in logged)
    for result in (manifest, forced):
        assert result["counts"]["written"] == 12 and result["counts"].get("dead_lettered", 0) == 0
        tool_call = result["scores"]["groups"]["tool_call/general"]
        # The scripted call came back as JSON text with the name as sent: the judge reads it there.
        assert (tool_call["call_rate"], tool_call["argument_accuracy"]) == (100.0, 75.0)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "on" / "cases").to_pylist()}
    assert (rows["c10"]["rule"], rows["c10"]["native"], rows["c10"]["reply_tool_calls"]) == ("json_call", "fallback", "")


def test_estimate_runs_nothing_and_says_its_assumptions(tmp_path, capsys):
    demo = REPO / "jobs/configs/eval_demo.yaml"
    assert main(["eval", "--config", str(demo), "--estimate", "llm.rpm=600", f"output={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out  # the demo's endpoint is not running: no request could have been made
    assert "111 cases (0 rows would be quarantined) from 3 files -> 112 requests to sim-gpt-4" in out
    assert "assumed 100 per case; at most 56,832 at llm.max_tokens" in out and "at the rpm limit" in out
    assert not (tmp_path / "o").exists()
    assert main(["eval", "--config", str(demo), "--estimate", "endpoint=", f"model={tmp_path}", "max_new_tokens=64",
                 "batch_size=8"]) == 0
    assert "111 cases" in (out := capsys.readouterr().out) and "14 batches of 8, at most 7,104 generated tokens" in out


def test_a_tiny_model_through_the_hugging_face_backend(ray_session, tmp_path):
    from conftest import write_tiny_data

    root = write_tiny_data(tmp_path / "tiny")
    sets = write_set(tmp_path / "set.jsonl", [case(i, ("react", "general")[i % 2], "") for i in range(6)])
    out = tmp_path / "out"
    manifest = run_eval(load_config(EvalConfig, None, [f"sets=[{sets}]", f"output={out}", f"model={root / 'model'}",
                                                        "max_new_tokens=8", "batch_size=3", "progress=false"]),
                        log=lambda *_: None)
    assert manifest["counts"]["written"] == 6
    assert set(manifest["scores"]["agent_h"]) == {"H_ReAct", "H_General", "H_Score"}
    rows = pq.read_table(out / "cases").to_pylist()
    assert len(rows) == 6 and all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert (out / "report.md").exists() and (out / "manifest.json").exists()


def test_a_missing_model_or_set_is_a_clear_error(tmp_path, capsys):
    sets = write_set(tmp_path / "set.jsonl", [case(0, "react", PROSE)])
    assert main(["eval", f"sets=[{sets}]", f"model={tmp_path / 'nope'}", f"output={tmp_path / 'o'}"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    half_copied = tmp_path / "half"
    half_copied.mkdir()
    (half_copied / "config.json").write_text("{}")
    assert main(["eval", f"sets=[{sets}]", f"model={half_copied}", f"output={tmp_path / 'o'}"]) == 2
    assert "has a config.json but no weights" in capsys.readouterr().err
    (half_copied / "model.safetensors").write_bytes(b"")
    assert main(["eval", f"sets=[{sets}]", f"model={half_copied}", f"output={tmp_path / 'o'}"]) == 2
    assert "has weights but no tokenizer" in capsys.readouterr().err
    assert main(["eval", f"sets=[{tmp_path / 'none.jsonl'}]", f"model={tmp_path}", f"output={tmp_path / 'o'}"]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="either model="):
        load_config(EvalConfig, None, [f"sets=[{sets}]"])
