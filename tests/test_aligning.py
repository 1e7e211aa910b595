"""Faithfulness and shape of every template-mode stream, on the real sample records."""

import contextlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from agentflan_ray.aligning.agentinstruct import parse_env_action, render_agentinstruct, split_instruction
from agentflan_ray.aligning.align import align, toolbench_stream
from agentflan_ray.aligning.toolbench import (
    qualified_name,
    render_instruct,
    render_react,
    render_tflan_cot,
    render_tflan_decomposed,
)
from agentflan_ray.aligning.verify import check_toolbench_sample
from agentflan_ray.balancing.balance import balance_sample
from agentflan_ray.config import load_config
from agentflan_ray.jobs.generate import GenerateConfig
from agentflan_ray.reading.agentinstruct import parse_agentinstruct
from agentflan_ray.reading.toolbench import parse_toolbench
from agentflan_ray.records import Message, RecordError, Sample

FIXTURES = Path(__file__).parent / "fixtures"
FORMAT_MARKERS = re.compile(r"Thought:|Action:|Action Input|THOUGHT:|ACTION:|Act:|Final Answer:|format|[Rr]espond with|[Rr]espond in|JSON")


def toolbench_trajectories():
    result = []
    for path in sorted((FIXTURES / "toolbench/answer").glob("*/*.json")):
        with contextlib.suppress(RecordError):
            result.append(parse_toolbench(json.loads(path.read_text()), "toolbench", path.stem)[0])
    assert len(result) == 6
    return result


def agentinstruct_trajectories():
    rows = [row for path in sorted((FIXTURES / "agentinstruct").glob("*.json")) for row in json.loads(path.read_text())]
    return [parse_agentinstruct(row, "agentinstruct", row["id"]) for row in rows]


TOOLBENCH = toolbench_trajectories()
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("render", [render_tflan_cot, render_tflan_decomposed], ids=["cot", "decomposed"])
def test_aligned_toolbench_keeps_every_call_and_observation(render, seed):
    for t in TOOLBENCH:
        sample = render(t, seed)
        assert check_toolbench_sample(sample, t) == [], t.id


@pytest.mark.parametrize("seed", SEEDS)
def test_aligned_system_prompts_list_tools_without_format_instructions(seed):
    for t in TOOLBENCH:
        for render in (render_tflan_cot, render_tflan_decomposed):
            system = render(t, seed).messages[0]
            assert system.role == "system"
            template_text = system.content
            for tool in t.tools:
                template_text = template_text.replace(str(tool.get("description", "")).replace('"', "'"), "")
                template_text = template_text.replace(json.dumps(tool.get("parameters", {}), ensure_ascii=False), "")
            assert not FORMAT_MARKERS.search(template_text), template_text
            assert all(qualified_name(tool["name"]) in system.content for tool in t.tools if tool["name"] != "Finish")
    for t in agentinstruct_trajectories():
        for sample in render_agentinstruct(t, seed, ["agent_instruct_tflan"]):
            assert not FORMAT_MARKERS.search(sample.messages[0].content)


def react_call(content: str):
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        lines = content.split("\n")
        return lines[-2].split(": ", 1)[1], json.loads(lines[-1].split(": ", 1)[1])
    keys = list(value)
    return value[keys[1]], value[keys[2]]


@pytest.mark.parametrize("seed", SEEDS)
def test_react_keeps_calls_including_finish(seed):
    for t in TOOLBENCH:
        sample = render_react(t, seed)
        calls = [react_call(m.content) for m in sample.messages if m.role == "assistant"]
        assert calls == [(s.call.name, s.call.arguments) for s in t.steps]
        observations = [m.content for m in sample.messages[2:] if m.role == "user"]
        assert observations == [s.observation for s in t.steps if s.call.name != "Finish"]


def test_react_varies_its_protocol_keys():
    keysets = Counter()
    for seed in range(12):
        for t in TOOLBENCH:
            first = render_react(t, seed).messages[2].content
            keysets[tuple(json.loads(first)) if first.startswith("{") else tuple(re.findall(r"^([^:\n]+):", first, re.M))] += 1
    assert len(keysets) >= 5


def test_instruct_answers_in_the_protocol_it_was_given():
    kinds = Counter()
    for seed in range(40):
        for t in TOOLBENCH:
            sample = render_instruct(t, seed)
            system, user, answer = sample.messages
            assert answer.capability == "instruction_following" and answer.loss
            if answer.content.startswith("{"):
                kinds["json"] += 1
                value = json.loads(answer.content)
                goal_key, name_key, args_key = list(value)
                name, args = value[name_key], value[args_key]
                assert f'"{name_key}"' in system.content
            else:
                kinds["text"] += 1
                lines = answer.content.split("\n")
                name = lines[-2].split(": ", 1)[1]
                args = json.loads(lines[-1].split(": ", 1)[1])
            assert (name, args) in [(qualified_name(s.call.name), s.call.arguments) for s in t.steps]
            assert name in user.content
    assert abs(kinds["json"] - kinds["text"]) <= 0.2 * sum(kinds.values())


def test_decomposed_labels_every_assistant_turn():
    for t in TOOLBENCH:
        sample = render_tflan_decomposed(t, 0)
        labels = [m.capability for m in sample.messages if m.role == "assistant"]
        calls = sum(1 for s in t.steps if s.call.name != "Finish")
        assert Counter(labels) == {"reasoning": calls + 1, "retrieval": calls, "understanding": calls}


def test_agentinstruct_tflan_keeps_every_action_and_observation():
    for t in agentinstruct_trajectories():
        react, tflan = render_agentinstruct(t, 0, ["agent_instruct_react", "agent_instruct_tflan"])
        assert [vars(m) for m in react.messages] == [vars(m) for m in t.messages]
        source_turns = t.messages[1:] if t.env == "mind2web" else t.messages[2:]
        source_actions = [parse_env_action(t.env, m.content) for m in source_turns if m.role == "assistant"]
        aligned = [m for m in tflan.messages if m.role == "assistant"]
        assert len(aligned) == len(source_actions)
        for action, message in zip(source_actions, aligned, strict=True):
            for part in action.payload.split(" ") if action.kind == "choice" else [action.payload]:
                assert part in message.content, (t.id, part)
            assert not re.search(r"^(Act|Action|THOUGHT|Think):", message.content, re.M), message.content
        task = [x] if (x := split_instruction(t.env, t.messages[0].content)) else []
        assert [m.content for m in tflan.messages if m.role == "user"] == task + [
            m.content for m in source_turns if m.role == "user"
        ]


def all_fixture_samples(config):
    from agentflan_ray.reading.agentflan import parse_agentflan
    from agentflan_ray.reading.sharegpt import parse_sharegpt

    samples = []
    for t in TOOLBENCH + agentinstruct_trajectories():
        samples += align(t, config)
    for row in json.loads((FIXTURES / "agentflan/openmanus_sample_raw.json").read_text()):
        samples += align(parse_agentflan(row, "agentflan", row["id"]), config)
    for row in json.loads((FIXTURES / "sharegpt/dialogstudio_sharegpt_original_example.json").read_text()):
        samples += align(parse_sharegpt(row, "sharegpt", row["id"]), config)
    return samples


def test_loss_is_only_ever_on_assistant_turns():
    config = load_config(GenerateConfig, None, ['inputs=[{format: sharegpt, path: x}]', "instruct_share=1.0"])
    samples = all_fixture_samples(config)
    assert {s.stream for s in samples} >= {"tflan_cot", "tflan_decomposed", "instruct", "agent_instruct_react",
                                           "agent_instruct_tflan", "general"}
    for sample in samples:
        for message in sample.messages:
            assert message.role in ("system", "user", "assistant")
            assert not message.loss or message.role == "assistant"
        assert any(m.loss for m in sample.messages), sample.id


def test_split_is_deterministic_and_follows_the_shares():
    config = load_config(GenerateConfig, None, ['inputs=[{format: sharegpt, path: x}]'])
    ids = [f"traj-{i}" for i in range(20000)]
    streams = [toolbench_stream(i, config) for i in ids]
    shares = Counter(streams)
    assert abs(shares["react"] / 20000 - 0.1) < 0.01
    assert abs(shares["tflan_cot"] / 20000 - 0.3) < 0.015
    assert abs(shares["tflan_decomposed"] / 20000 - 0.6) < 0.015
    assert streams == [toolbench_stream(i, config) for i in ids]
    config.seed = 1
    assert streams != [toolbench_stream(i, config) for i in ids]


@pytest.mark.parametrize("preset, ratios", [("paper", (1.0, 0.25, 0.75)), ("r10r5u7", (1.0, 0.5, 0.7))])
def test_balancing_keeps_each_capability_at_its_ratio(preset, ratios):
    config = load_config(GenerateConfig, None, ['inputs=[{format: sharegpt, path: x}]', f"balance.preset={preset}"])
    kept, total = Counter(), Counter()
    for i in range(3000):
        messages = [Message("user", "q")] + [
            Message("assistant", "x", loss=True, capability=c) for c in ("reasoning", "retrieval", "understanding")
        ]
        sample = Sample(f"s{i}", "src", f"s{i}", "tflan_decomposed", messages)
        balanced = balance_sample(sample, config.balance.resolved(), seed=0)
        assert all(m.loss for m in sample.messages[1:])  # the input is not changed
        for m in balanced.messages[1:]:
            total[m.capability] += 1
            kept[m.capability] += m.loss
        assert [m.content for m in balanced.messages] == ["q", "x", "x", "x"]
    for capability, ratio in zip(("reasoning", "retrieval", "understanding"), ratios, strict=True):
        assert abs(kept[capability] / total[capability] - ratio) < 0.03
