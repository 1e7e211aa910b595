"""Render a ``ToolTrajectory`` into the ToolBench streams of Agent-FLAN (template mode).

One step of the source, and what each stream makes of it::

    source      thought . call(name, args) . observation
    react       A: "Thought: ..\\nAction: name\\nAction Input: {..}"  U: observation
    tflan_cot   A: "<thought> <connective naming tool>\\n```python\\n{'name': .., 'parameters': {..}}\\n```"
                U: observation
    decomposed  A[reasoning]: thought  U: which tool?  A[retrieval]: tool name
                U: which arguments?  A[understanding]: ```json {..}```  U: observation

The final ``Finish`` call stays a call in `react` and becomes a plain prose answer in the chat-aligned
streams. Observations are copied verbatim; call names and arguments are never changed (aligned
streams name a function ``<tool>.<function>`` as the Agent-FLAN release does).
"""

from __future__ import annotations

import json
import random

from agentflan_ray.aligning import templates as T
from agentflan_ray.aligning.prompts import Prose, say
from agentflan_ray.aligning.split import rng_for, unit_hash
from agentflan_ray.reading.toolbench import FINISH
from agentflan_ray.records import Message, Sample, Step, ToolTrajectory, tools_json


def qualified_name(function: str) -> str:
    """``get_x_for_weather`` -> ``weather.get_x_for_weather`` (ToolBench names end in ``_for_<tool>``)."""
    if "_for_" in function:
        return f"{function.rsplit('_for_', 1)[1]}.{function}"
    return function


def aligned_system_prompt(tools: list[dict]) -> str:
    lines = [T.ALIGNED_SYSTEM]
    for tool in tools:
        if tool.get("name") == FINISH:
            continue
        description = str(tool.get("description", "")).replace('"', "'")
        parameters = json.dumps(tool.get("parameters", {}), ensure_ascii=False)
        lines.append(f"{qualified_name(tool['name'])}: {description}\nInput parameters are as follows: {parameters}\n")
    return "\n".join(lines).rstrip() + "\n"


def thought_of(step: Step, rng: random.Random) -> str:
    if step.thought:
        return step.thought
    tool = qualified_name(step.call.name) if step.call else "the tools"
    return rng.choice(T.FALLBACK_THOUGHTS).format(tool=tool)


def _sample(t: ToolTrajectory, stream: str, messages: list[Message]) -> Sample:
    return Sample(
        id=f"{t.source}/{t.id}/{stream}",
        source=t.source,
        source_id=t.id,
        stream=stream,
        messages=messages,
        tools=tools_json(t.tools),
    )


def _head(system: str, t: ToolTrajectory) -> list[Message]:
    return [Message("system", system), Message("user", t.query)]


def render_tflan_cot(t: ToolTrajectory, seed: int, prose: Prose | None = None) -> Sample:
    rng = rng_for(seed, t.id, "tflan_cot")
    messages = _head(aligned_system_prompt(t.tools), t)
    for i, step in enumerate(t.steps):
        if step.call.name == FINISH:
            messages.append(Message("assistant", say(prose, f"s{i}.final", "final", _final_turn(step, t), step=i),
                                    loss=True))
            continue
        name = qualified_name(step.call.name)
        call = repr({"name": name, "parameters": step.call.arguments})
        connective = say(prose, f"s{i}.connective", "connective", rng.choice(T.COT_CONNECTIVES).format(name=name),
                         name, i)
        thought = say(prose, f"s{i}.thought", "thought", thought_of(step, rng), name, i)
        text = f"{thought} {connective}\n```python\n{call}\n```"
        messages += [Message("assistant", text, loss=True), Message("user", step.observation)]
    return _sample(t, "tflan_cot", messages)


def render_tflan_decomposed(t: ToolTrajectory, seed: int, prose: Prose | None = None) -> Sample:
    rng = rng_for(seed, t.id, "tflan_decomposed")
    messages = _head(aligned_system_prompt(t.tools), t)
    for i, step in enumerate(t.steps):
        if step.call.name == FINISH:
            final = say(prose, f"s{i}.final", "final", _final_turn(step, t), step=i)
            messages.append(Message("assistant", final, loss=True, capability="reasoning"))
            continue
        name = qualified_name(step.call.name)
        lead = rng.choice(T.ARGUMENT_LEADS)
        arguments = f"```json\n{json.dumps(step.call.arguments, ensure_ascii=False)}\n```"
        thought = say(prose, f"s{i}.thought", "thought", thought_of(step, rng), name, i)
        elicit_tool = say(prose, f"s{i}.elicit_tool", "elicit_tool", rng.choice(T.ELICIT_TOOL), name, i)
        retrieval = rng.choice(T.RETRIEVAL_ANSWERS).format(name=name)
        elicit_arguments = say(prose, f"s{i}.elicit_arguments", "elicit_arguments", rng.choice(T.ELICIT_ARGUMENTS),
                               name, i)
        messages += [
            Message("assistant", thought, loss=True, capability="reasoning"),
            Message("user", elicit_tool),
            Message("assistant", retrieval, loss=True, capability="retrieval"),
            Message("user", elicit_arguments),
            Message("assistant", f"{lead}\n{arguments}".strip(), loss=True, capability="understanding"),
            Message("user", step.observation),
        ]
    return _sample(t, "tflan_decomposed", messages)


def _final_turn(step: Step, t: ToolTrajectory) -> str:
    return f"{step.thought}\n\n{t.final_answer}" if step.thought else t.final_answer


def render_react(t: ToolTrajectory, seed: int) -> Sample:
    rng = rng_for(seed, t.id, "react")
    use_json = unit_hash(seed, t.id, "react-protocol") < 0.5
    keys = rng.choice(T.REACT_JSON_KEYS if use_json else T.REACT_TEXT_KEYS)
    tools = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in t.tools)
    if use_json:
        shape = json.dumps({keys[0]: "your reasoning", keys[1]: "the function name", keys[2]: {"argument": "value"}})
        protocol = f"Respond with one JSON object per turn, like this:\n{shape}"
    else:
        protocol = f"Respond in this format:\n{keys[0]}: your reasoning\n{keys[1]}: the function name\n{keys[2]}: the arguments as JSON"
    system = (
        "You can use the following functions to handle the user's request. Call Finish with "
        'return_type "give_answer" and your final_answer when you are done.\n'
        f"{tools}\n{protocol}"
    )
    messages = _head(system, t)
    for step in t.steps:
        thought = thought_of(step, rng)
        if use_json:
            text = json.dumps({keys[0]: thought, keys[1]: step.call.name, keys[2]: step.call.arguments},
                              ensure_ascii=False, indent=2)
        else:
            text = f"{keys[0]}: {thought}\n{keys[1]}: {step.call.name}\n{keys[2]}: {json.dumps(step.call.arguments, ensure_ascii=False)}"
        messages.append(Message("assistant", text, loss=True))
        if step.call.name != FINISH:
            messages.append(Message("user", step.observation))
    return _sample(t, "react", messages)


def render_instruct(t: ToolTrajectory, seed: int) -> Sample | None:
    """One format-following sample: one API, one response protocol, one exact call to make."""
    calls = [step for step in t.steps if step.call.name != FINISH]
    if not calls:
        return None
    rng = rng_for(seed, t.id, "instruct")
    step = rng.choice(calls)
    schema = next((tool for tool in t.tools if tool.get("name") == step.call.name), {"name": step.call.name})
    name = qualified_name(step.call.name)
    goal = thought_of(step, rng)
    use_json = unit_hash(seed, t.id, "instruct-protocol") < 0.5
    keys = rng.choice(T.INSTRUCT_JSON_KEYS if use_json else T.INSTRUCT_TEXT_KEYS)
    if use_json:
        protocol = (
            "Please directly generate the response in JSON format, an object with the keys "
            f'"{keys[0]}" (your current thought), "{keys[1]}" (the API name to call) and "{keys[2]}" '
            "(the input parameters as an object). Do not add comments."
        )
        answer = json.dumps({keys[0]: goal, keys[1]: name, keys[2]: step.call.arguments}, ensure_ascii=False, indent=4)
    else:
        protocol = (
            "Please directly generate the response in exactly this form, one field per line:\n"
            f"{keys[0]}: <your current thought>\n{keys[1]}: <the API name to call>\n{keys[2]}: <the input parameters as JSON>"
        )
        answer = f"{keys[0]}: {goal}\n{keys[1]}: {name}\n{keys[2]}: {json.dumps(step.call.arguments, ensure_ascii=False)}"
    parameters = [f"'{k}' is {json.dumps(v, ensure_ascii=False)}" for k, v in step.call.arguments.items()]
    system = f"You have access to the following API:\n{json.dumps({**schema, 'name': name}, ensure_ascii=False)}\n{protocol}"
    user = f"You can input '{keys[0]}' with: '{goal}'. Call the function {name} with the parameter as follows: {json.dumps(parameters, ensure_ascii=False)}."
    messages = [
        Message("system", system),
        Message("user", user),
        Message("assistant", answer, loss=True, capability="instruction_following"),
    ]
    sample = _sample(t, "instruct", messages)
    sample.tools = tools_json([schema])
    return sample
