"""Read the calls back out of a rendered sample and compare them with the source trajectory.

Used by the tests on every template rendering and, for LLM rewrites, to accept or reject a reply:
the tool name and arguments of every call must survive exactly (as parsed values), every
observation must be unchanged, and no call may be added.
"""

from __future__ import annotations

import ast
import json
import re

from agentflan_ray.aligning.toolbench import qualified_name
from agentflan_ray.reading.toolbench import FINISH
from agentflan_ray.records import Message, Sample, ToolTrajectory

PY_BLOCK = re.compile(r"```python\n(.*?)\n```", re.S)
JSON_BLOCK = re.compile(r"```json\n(.*?)\n```", re.S)
ANY_BLOCK = re.compile(r"```")


def calls_in_tflan_cot(messages: list[Message]) -> list[tuple[str, dict]]:
    calls = []
    for message in messages:
        if message.role != "assistant":
            continue
        for block in PY_BLOCK.findall(message.content):
            value = ast.literal_eval(block)
            calls.append((value["name"], value["parameters"]))
    return calls


def calls_in_decomposed(messages: list[Message], names: list[str]) -> list[tuple[str, dict]]:
    """Pair each retrieval turn (a tool name) with the understanding turn that follows it."""
    calls, pending = [], None
    by_length = sorted(names, key=len, reverse=True)
    for message in messages:
        if message.role != "assistant":
            continue
        if message.capability == "retrieval":
            pending = next((n for n in by_length if n in message.content), None)
        elif message.capability == "understanding":
            block = JSON_BLOCK.search(message.content)
            calls.append((pending, json.loads(block.group(1)) if block else None))
            pending = None
    return calls


def observations(messages: list[Message], after_call) -> list[str]:
    """User turns that directly follow an assistant turn for which ``after_call`` is true."""
    result = []
    for previous, message in zip(messages, messages[1:], strict=False):
        if message.role == "user" and previous.role == "assistant" and after_call(previous):
            result.append(message.content)
    return result


def check_toolbench_sample(sample: Sample, source: ToolTrajectory, final_rewritten: bool = False) -> list[str]:
    """Return the faithfulness problems of an aligned ToolBench sample (empty when faithful). With
    ``final_rewritten`` the final answer may be reworded (its facts are checked piece by piece)."""
    problems = []
    expected = [(qualified_name(s.call.name), s.call.arguments) for s in source.steps if s.call.name != FINISH]
    expected_obs = [s.observation for s in source.steps if s.call.name != FINISH]
    if sample.stream == "tflan_cot":
        found = calls_in_tflan_cot(sample.messages)
        found_obs = observations(sample.messages, lambda m: bool(PY_BLOCK.search(m.content)))
        blocks = sum(len(ANY_BLOCK.findall(m.content)) // 2 for m in sample.messages if m.role == "assistant")
        if blocks != len(found):
            problems.append(f"{blocks} code blocks for {len(found)} calls")
    elif sample.stream == "tflan_decomposed":
        names = [qualified_name(t["name"]) for t in source.tools]
        found = calls_in_decomposed(sample.messages, names)
        found_obs = observations(sample.messages, lambda m: m.capability == "understanding")
    else:
        raise ValueError(f"no checker for stream {sample.stream}")
    if found != expected:
        problems.append(f"calls differ: {found!r} != {expected!r}")
    if found_obs != expected_obs:
        problems.append("observations differ from the source")
    final = sample.messages[-1]
    if final.role != "assistant" or not (final_rewritten or source.final_answer in final.content):
        problems.append("the final answer is not the last assistant turn")
    return problems


def check_env_sample(sample: Sample, actions: Sample) -> list[str]:
    """The faithfulness problems of an `agent_instruct_tflan` sample whose thoughts were rewritten,
    against ``actions``, the same rendering with every thought left out: each agent turn must end
    with exactly its action (the same fenced blocks, none added) and every other turn be unchanged."""
    if [m.role for m in sample.messages] != [m.role for m in actions.messages]:
        return ["turns differ from the source"]
    problems = []
    for i, (turn, action) in enumerate(zip(sample.messages, actions.messages, strict=True)):
        if turn.role != "assistant":
            if turn.content != action.content:
                problems.append(f"turn {i}: a {turn.role} turn changed")
        elif not turn.content.endswith(action.content) or \
                len(ANY_BLOCK.findall(turn.content)) != len(ANY_BLOCK.findall(action.content)):
            problems.append(f"turn {i}: the action differs from the source")
    return problems
