"""`rewrite: llm`: every piece check, every corruption caught, and the generate job on the real
sample records against the simulator (corrupted replies, a 400, a kill, a rerun, a bad key)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, SIM_KEY, demo_overrides, kill_and_settle, wait_until
from test_aligning import TOOLBENCH, agentinstruct_trajectories

from agentflan_ray.aligning import prompts
from agentflan_ray.aligning.prompts import Piece, Prose, piece_problem, reason_of
from agentflan_ray.aligning.rewrite import QUEUE, RewriteTask, context_of, faithfulness, render
from agentflan_ray.aligning.verify import JSON_BLOCK, PY_BLOCK, calls_in_decomposed, calls_in_tflan_cot
from agentflan_ray.cli import main
from agentflan_ray.config import load_config
from agentflan_ray.jobs.generate import GenerateConfig
from agentflan_ray.jobs.generate import run as generate
from agentflan_ray.llm import sim_rewrite
from agentflan_ray.llm.client import Completion
from agentflan_ray.llm.stage import InvalidReply
from agentflan_ray.records import trajectory_to_row

THOUGHT = Piece("s1.thought", "thought", "I should look up the weather in Paris for 3 days.", "weather.get_forecast_for_weather", 1)
FACTS = 'What is the weather in Paris? {"city": "Paris", "days": 3} weather.get_forecast_for_weather "sunny"'
NAMES = ["weather.get_forecast_for_weather", "get_forecast_for_weather", "weather.get_alerts_for_weather",
         "get_alerts_for_weather"]


@pytest.mark.parametrize(("text", "reason"), [
    ("I'll check the forecast for Paris.", ""),
    ("Let me call get_forecast_for_weather for the next 3 days.", ""),
    ("  ", "empty"),
    ("Checking:\n```python\n{'name': 'x', 'parameters': {}}\n```", "call_syntax"),
    ("I will check.\nAction: get_forecast_for_weather\nAction Input: {}", "call_syntax"),
    ("Thought: I need the forecast.", "call_syntax"),
    ("The call is {'name': 'get_forecast_for_weather', 'parameters': {'city': 'Paris'}}", "call_syntax"),
    ('So: {"name": "get_forecast_for_weather", "arguments": {}}', "call_syntax"),
    ("I'll run weather.get_forecast_for_weather(city='Paris').", "call_syntax"),
    ("<tool_call>get_forecast_for_weather</tool_call>", "call_syntax"),
    ("This is not the first time I try this task, so I'll go on.", "dfsdt_artifact"),
    ("Based on the previous action, the forecast is next.", "dfsdt_artifact"),
    ("I could also use get_alerts_for_weather here.", "foreign_tool"),
    ("An invented lookup_for_newsapi would help.", "foreign_tool"),
    ("I need the forecast for 5 days.", "unsupported_number"),
    ('The user wants "rainy" weather.', "unsupported_literal"),
    ('The sky should be "sunny" for 3 days.', ""),
])
def test_each_piece_check_names_its_reason(text, reason):
    assert reason_of(piece_problem(text, THOUGHT, FACTS, NAMES)) == reason


def test_elicit_pieces_name_no_tool_and_finals_keep_their_numbers():
    elicit = Piece("s1.elicit_tool", "elicit_tool", "Which tool?", "weather.get_forecast_for_weather", 1)
    assert reason_of(piece_problem("Will you use get_forecast_for_weather?", elicit, FACTS, NAMES)) == "foreign_tool"
    final = Piece("s2.final", "final", "It is sunny for 3 days in Paris.", step=2)
    assert piece_problem("Paris will be sunny for the next 3 days.", final, FACTS, NAMES) == ""
    assert reason_of(piece_problem("Paris will be sunny.", final, FACTS, NAMES)) == "missing_fact"


def test_reply_shape_checks():
    assert prompts.reply_problems('{"pieces": ["a", "b"]}', 2) == (["a", "b"], "")
    assert reason_of(prompts.reply_problems('{"pieces": ["a"', 2)[1]) == "not_json"
    assert reason_of(prompts.reply_problems('["a", "b"]', 2)[1]) == "not_an_object"
    assert reason_of(prompts.reply_problems('{"pieces": ["a"]}', 2)[1]) == "wrong_piece_count"


# --- the task on real trajectories, with the simulator's plausible and corrupted replies --------

TRAJECTORIES = [(t, "tflan_cot") for t in TOOLBENCH] + [(t, "tflan_decomposed") for t in TOOLBENCH] + \
               [(t, "agent_instruct_tflan") for t in agentinstruct_trajectories()]
EXPECTED = {"changed_number": {"unsupported_number", "missing_fact"}, "invented_call": {"call_syntax"},
            "foreign_tool": {"foreign_tool"}, "missing_item": {"wrong_piece_count"},
            "extra_item": {"wrong_piece_count"}, "broken_json": {"not_json"}, "cut_off": {"cut_off"},
            "empty_piece": {"empty"}}


def run_task(t, target, reply):
    """The task's one output row when every request is answered by ``reply(request) -> (content,
    finish)``; a reply the task's validation rejects is handed back as the stage does after its re-asks."""
    rejected = []

    async def complete(messages, response_format, validate):
        content, finish = reply(sim_rewrite.parse_request(messages))
        completion = Completion(content, finish, 10, 10)
        problem = "cut off" if finish == "length" else validate(completion)
        if problem:
            rejected.append(problem)
            raise InvalidReply(problem, last=completion)
        return completion

    row = {**trajectory_to_row(t), "target": target}
    [out] = asyncio.run(RewriteTask(seed=0, model="sim-gpt-4").rows(row, complete))
    return out, json.loads(out["meta"]), rejected


@pytest.mark.parametrize(("t", "target"), TRAJECTORIES[::3], ids=lambda v: getattr(v, "id", v))
def test_plausible_replies_are_accepted_and_the_sample_stays_faithful(t, target):
    out, meta, rejected = run_task(t, target, lambda r: (json.dumps({"pieces": sim_rewrite.plausible(r)}), "stop"))
    assert rejected == [] and meta["status"] == "rewritten" and meta["fallbacks"] == {}, meta
    assert meta["model"] == "sim-gpt-4" and meta["prompt_version"] == prompts.PROMPT_VERSION
    sample = render(t, target, 0)
    sample.messages = [type(sample.messages[0])(**m) for m in out["messages"]]
    assert faithfulness(sample, t, target, 0) == []
    assert out["messages"] != render(t, target, 0).to_row()["messages"]  # the prose did change


@pytest.mark.parametrize("kind", sim_rewrite.CORRUPTIONS)
def test_each_corruption_is_caught_and_falls_back_by_its_reason(kind):
    caught = 0
    for t, target in TRAJECTORIES[:12]:
        def reply(request):
            return sim_rewrite.corrupt(request, sim_rewrite.plausible(request), kind)
        out, meta, rejected = run_task(t, target, reply)
        assert rejected, f"a {kind} reply got through for {t.id}"
        reasons = set(meta["fallbacks"].values())
        assert reasons and reasons <= EXPECTED[kind], (kind, meta)
        caught += 1
        template = render(t, target, 0).to_row()["messages"]
        if meta["status"] == "template":
            assert out["messages"] == template
    assert caught == 12


def test_a_reply_fixed_after_a_reask_is_used():
    t, target = TRAJECTORIES[0]
    asked = []

    async def complete(messages, response_format, validate):  # the stage's re-ask loop, in short
        request = sim_rewrite.parse_request(messages)
        for content, finish in (sim_rewrite.corrupt(request, sim_rewrite.plausible(request), "invented_call"),
                                (json.dumps({"pieces": sim_rewrite.plausible(request)}), "stop")):
            completion = Completion(content, finish, 1, 1)
            asked.append(validate(completion))
            if not asked[-1]:
                return completion
        raise AssertionError("unreachable")

    [out] = asyncio.run(RewriteTask(0, "sim-gpt-4").rows({**trajectory_to_row(t), "target": target}, complete))
    assert reason_of(asked[0].split(": ", 1)[1]) == "call_syntax" and asked[1] is None
    assert json.loads(out["meta"])["status"] == "rewritten"


def test_the_prompt_carries_prose_and_context_not_whole_observations():
    def prompt(t):
        recorder = Prose()
        render(t, "tflan_cot", 0, recorder)
        return prompts.build_messages(context_of(t), recorder.pieces), recorder.pieces

    t = copy.deepcopy(TOOLBENCH[0])
    messages, pieces = prompt(t)
    request = json.loads(messages[1]["content"])
    assert [draft for _, _, draft in request["pieces"]] == [p.template for p in pieces]
    assert request["task"] == t.query and len(request["steps"]) == sum(s.call.name != "Finish" for s in t.steps)
    t.steps[0].observation += "x" * 50_000  # a bulky observation costs at most a clipped view
    bulky, _ = prompt(t)
    assert len(bulky[1]["content"]) - len(messages[1]["content"]) <= prompts.CLIP


# --- the job ---------------------------------------------------------------------------------------

TOOL_STREAMS = ("tflan_cot", "tflan_decomposed")
ALL_REWRITTEN = ("toolbench_split={react: 0.0, tflan_cot: 0.4, tflan_decomposed: 0.6}",)
DFSDT = prompts.DFSDT


def llm_overrides(url: str, *extra: str) -> list[str]:
    return ["rewrite=llm", f"llm.base_url={url}", "llm.model=sim-gpt-4", "llm.backoff_initial_s=0.05",
            "llm.backoff_max_s=1", "llm.concurrency=8", "llm.batch_size=8", *ALL_REWRITTEN, *extra]


def run_generate(overrides: list[str], log=lambda *_: None) -> dict:
    return generate(load_config(GenerateConfig, None, overrides), log=log)


def by_id(root: Path, streams) -> dict[str, dict]:
    return {row["id"]: row for stream in streams if (root / stream).exists()
            for row in pq.read_table(root / stream).to_pylist()}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))}


def calls_and_observations(row: dict, names: list[str]):
    """What code renders, read back out of a sample: its calls, observations and action blocks."""
    from agentflan_ray.records import Message

    messages = [Message(**m) for m in row["messages"]]
    if row["stream"] == "tflan_cot":
        calls = calls_in_tflan_cot(messages)
    elif row["stream"] == "tflan_decomposed":
        calls = calls_in_decomposed(messages, names)
    else:
        calls = [re.findall(r"```.*?```", m.content, re.S) for m in messages if m.role == "assistant"]
    after_call = [m.content for prev, m in zip(messages, messages[1:], strict=False)
                  if m.role == "user" and prev.role == "assistant" and (PY_BLOCK.search(prev.content) or
                  JSON_BLOCK.search(prev.content) or prev.capability is None and "```" in prev.content)]
    return calls, after_call, [m.content for m in messages if m.role in ("system",)]


def test_rewrite_on_the_real_records_with_corrupted_replies(ray_session, simulator, sample_data, tmp_path):
    server, url = simulator(latency_s=0.01, corrupt=0.3)
    template_out, out = tmp_path / "template", tmp_path / "llm"
    run_generate([*demo_overrides(sample_data, template_out), *ALL_REWRITTEN])
    lines = []
    manifest = run_generate([*demo_overrides(sample_data, out), *llm_overrides(url)], log=lines.append)

    # Every record and every trajectory accounted for.
    counts, rewrite = manifest["counts"], manifest["rewrite"]
    assert counts["read"] == counts["written"] + counts["quarantined"] == 51
    assert rewrite["trajectories"] == rewrite["asked"] == 6 + 30
    assert rewrite["rewritten"] + rewrite["partly_rewritten"] + rewrite["template"] == 36
    assert rewrite["rewritten"] >= 0.9 * 36, rewrite
    faults = server.stats()["faults"]
    assert sum(faults.values()) >= 5 and rewrite["reasks"] >= 5  # corrupted replies were sent, and re-asked
    assert rewrite["requests"] == rewrite["asked"] + rewrite["reasks"] and rewrite["prompt_tokens"] > 0
    assert not (out / QUEUE).exists()

    # Faithful by construction, proven on every sample: what code renders is what template mode renders.
    streams = [*TOOL_STREAMS, "agent_instruct_tflan"]
    rewritten = {i: row for i, row in by_id(out, streams).items() if row["meta"]}  # not the release's rows
    template = {i: row for i, row in by_id(template_out, streams).items() if i in rewritten}
    assert set(template) == set(rewritten) and len(rewritten) == 36
    names = [n for t in TOOLBENCH for tool in t.tools for n in [f"{tool['name'].rsplit('_for_', 1)[-1]}.{tool['name']}"]]
    changed = 0
    for sample_id, row in rewritten.items():
        meta = json.loads(row["meta"])
        assert calls_and_observations(row, names) == calls_and_observations(template[sample_id], names), sample_id
        assert len(row["messages"]) == len(template[sample_id]["messages"])
        changed += row["messages"] != template[sample_id]["messages"]
        if meta["status"] == "rewritten":
            prose = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert not any(DFSDT.search(text) for text in prose), sample_id
            for text in prose:  # no corrupted number or invented call got in
                outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
                assert prompts.call_syntax(outside_code) == "", (sample_id, outside_code)
    assert changed >= 0.9 * 36
    template_artifacts = sum(bool(DFSDT.search(m["content"])) for row in template.values() for m in row["messages"]
                             if m["role"] == "assistant")
    assert template_artifacts > 0  # the same data in template mode keeps DFSDT talk; rewritten samples none

    # Secrets: the key is nowhere in what the job wrote or logged.
    for path in out.rglob("*"):
        if path.is_file():
            assert SIM_KEY.encode() not in path.read_bytes(), path
    assert SIM_KEY not in "\n".join(map(str, lines))

    # A rerun of the finished job asks nothing and writes the same bytes.
    answered = server.stats()["answered"]
    before = digests(out)
    again = run_generate([*demo_overrides(sample_data, out), *llm_overrides(url)])
    assert server.stats()["answered"] == answered and again["rewrite"]["requests"] == 0
    assert digests(out) == before


def longest_prompt_tokens(sample_data: Path) -> tuple[int, int]:
    """The simulator's token count of the longest and second-longest rewrite prompt of the records."""
    from agentflan_ray.llm.simulator import estimate_tokens

    sizes = []
    for t, target in TRAJECTORIES:
        recorder = Prose()
        render(t, target, 0, recorder)
        pieces = [p for p in recorder.pieces if p.template.strip()]
        messages = prompts.build_messages(context_of(t), pieces)
        sizes.append(estimate_tokens(json.dumps(messages, sort_keys=True, ensure_ascii=False)))
    first, second = sorted(set(sizes), reverse=True)[:2]
    return first, second


def test_a_400_dead_letters_one_trajectory_and_it_falls_back(ray_session, simulator, sample_data, tmp_path):
    longest, next_longest = longest_prompt_tokens(sample_data)
    _, url = simulator(context_tokens=next_longest)  # only the longest prompt is over the context
    manifest = run_generate([*demo_overrides(sample_data, tmp_path / "out"), *llm_overrides(url)])
    rewrite = manifest["rewrite"]
    assert rewrite["dead_lettered"] == {"http_400": 1}
    assert rewrite["fell_back"]["samples_by_reason"] == {"dead_lettered": 1}
    assert rewrite["template"] == 1 and rewrite["rewritten"] + rewrite["partly_rewritten"] == 35
    assert manifest["counts"]["written"] + manifest["counts"]["quarantined"] == 51
    rows = [r for r in by_id(tmp_path / "out", [*TOOL_STREAMS, "agent_instruct_tflan"]).values() if r["meta"]]
    fell_back = [json.loads(r["meta"]) for r in rows if json.loads(r["meta"])["status"] == "template"]
    assert len(fell_back) == 1 and fell_back[0]["fallback"].startswith("dead_lettered: http_400")


@pytest.mark.slow
def test_a_rerun_after_a_kill_repeats_no_answered_request(ray_session, simulator, sample_data, tmp_path):
    import ray

    server, url = simulator(latency_s=0.3)
    out = tmp_path / "out"
    overrides = [*demo_overrides(sample_data, out), *llm_overrides(url, "llm.concurrency=2", "llm.actors=1")]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, "-m", "agentflan_ray.cli", "generate", *overrides], env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: server.stats()["answered"] >= 10 or job.poll() is not None, 120, "10 answers")
    answered_before, cached = kill_and_settle(job, server, out)
    assert 10 <= answered_before < 36 and cached >= 8 and not (out / "manifest.json").exists()

    manifest = run_generate(overrides)
    assert manifest["rewrite"]["cached"] == cached and manifest["rewrite"]["asked"] == 36
    stats = server.stats()
    assert stats["repeated_answers"] == answered_before - cached
    assert stats["unique_prompts_answered"] == 36


def test_an_invalid_key_stops_the_job_before_ray_starts(simulator, sample_data, tmp_path, monkeypatch, capsys):
    _, url = simulator()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-000000000000")
    started = time.monotonic()
    code = main(["generate", *demo_overrides(sample_data, tmp_path / "out"), *llm_overrides(url)])
    assert code == 2 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY" in err and "sk-wrong-key" not in err
    assert not (tmp_path / "out").exists()


def test_estimate_builds_the_real_prompts_and_calls_nothing(ray_session, simulator, sample_data, tmp_path,
                                                           monkeypatch, capsys):
    from agentflan_ray.jobs.generate import estimate

    server, url = simulator(latency_s=0.01)
    overrides = [*demo_overrides(sample_data, tmp_path / "out"), *llm_overrides(url)]
    monkeypatch.delenv("OPENAI_API_KEY")  # an estimate needs no key
    assert main(["generate", *overrides, "--estimate", "estimate_records=1000"]) == 0
    printed = capsys.readouterr().out
    assert "no API call made" in printed and "36 rewrite requests" in printed and "cost: $" in printed
    assert server.stats()["answered"] == 0 and not (tmp_path / "out").exists()

    projected = estimate(load_config(GenerateConfig, None, [*overrides, "estimate_records=1000"]), log=lambda *_: None)
    # Trajectories held out for the eval suites are never rewritten: not in the estimate either.
    held = estimate(load_config(GenerateConfig, None, [*overrides, "estimate_records=1000", "eval_holdout=0.5"]),
                    log=lambda *_: None)
    assert held["projected"]["records"] == projected["projected"]["records"]
    assert 0 < held["projected"]["requests"] < projected["projected"]["requests"]
    monkeypatch.setenv("OPENAI_API_KEY", SIM_KEY)
    manifest = run_generate(overrides)
    rewrite = manifest["rewrite"]
    assert projected["projected"]["records"] == manifest["counts"]["read"]
    assert projected["projected"]["requests"] == rewrite["asked"] == 36
    # The same prompts, counted the same way: exact when no reply needed a re-ask.
    assert rewrite["reasks"] == 0 and projected["projected"]["prompt_tokens"] == rewrite["prompt_tokens"]
    assert 0.5 < projected["projected"]["completion_tokens"] / rewrite["completion_tokens"] < 2
