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
from agentflan_ray.jobs.eval import run as run_eval

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
    assert main(["eval", f"sets=[{tmp_path / 'none.jsonl'}]", f"model={tmp_path}", f"output={tmp_path / 'o'}"]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="either model="):
        load_config(EvalConfig, None, [f"sets=[{sets}]"])
