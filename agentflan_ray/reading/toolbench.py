"""ToolBench DFSDT answer trees -> ``ToolTrajectory``.

The trajectory is the last list of ``answer_generation.train_messages`` (OpenAI function-calling
messages); the tool schemas are ``answer_generation.function``. Only ``valid_data`` trees whose
last call is ``Finish`` with ``return_type: give_answer`` are kept.

DFSDT inserts a user message "This is not the first time you try this task..." when it backtracks.
That message is a search artefact, not part of the task: it is removed from the trajectory (and
counted by the caller through ``RETRY_PREFACE_NOTE``) so the rest of the path can still be used.
"""

from __future__ import annotations

from agentflan_ray.reading.jsontext import loads
from agentflan_ray.records import RecordError, Step, ToolCall, ToolTrajectory

RETRY_PREFACE = "This is not the first time you try this task"
FINISH = "Finish"


def parse_toolbench(record: dict, source: str, source_id: str) -> tuple[ToolTrajectory, int]:
    """Return the trajectory and the number of retry-preface messages removed from it."""
    answer = _field(record, "answer_generation", dict)
    if answer.get("valid_data") is not True:
        raise RecordError("toolbench_invalid_data", "answer_generation.valid_data is not true")
    train_messages = _field(answer, "train_messages", list)
    if not train_messages:
        raise RecordError("empty_trajectory", "answer_generation.train_messages is empty")
    messages = train_messages[-1]
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"the last train_messages entry is {type(messages).__name__}, not a list")
    if not messages:
        raise RecordError("empty_trajectory", "the last train_messages list is empty")
    functions = answer.get("function", [])
    if not isinstance(functions, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
        raise RecordError("wrong_type", "answer_generation.function must be a list of schemas with a name")

    removed = 0
    kept = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RecordError("wrong_type", "a message is not an object with a role")
        if message["role"] == "user" and RETRY_PREFACE in _text(message):
            removed += 1
            continue
        kept.append(message)

    if len(kept) < 3 or kept[0]["role"] != "system" or kept[1]["role"] != "user":
        raise RecordError("roles_out_of_order", "expected system, user, then assistant turns")
    system, query = _text(kept[0]), _text(kept[1]).strip()
    if query.endswith("Begin!"):
        query = query[: -len("Begin!")].rstrip()
    steps = _steps(kept[2:])
    last = steps[-1].call if steps else None
    if last is None or last.name != FINISH:
        raise RecordError("toolbench_no_finish", "the trajectory does not end with a Finish call")
    if last.arguments.get("return_type") != "give_answer":
        raise RecordError("toolbench_give_up", f"Finish return_type is {last.arguments.get('return_type')!r}")
    final_answer = last.arguments.get("final_answer")
    if not isinstance(final_answer, str) or not final_answer.strip():
        raise RecordError("toolbench_empty_answer", "Finish carries no final_answer")
    trajectory = ToolTrajectory(
        id=source_id,
        source=source,
        query=query,
        system=system,
        tools=functions,
        steps=steps,
        final_answer=final_answer,
    )
    return trajectory, removed


def _steps(messages: list[dict]) -> list[Step]:
    """Group assistant/function messages into steps. An assistant message with text but no call is
    a thought that carries over into the next step."""
    steps: list[Step] = []
    pending_thought: list[str] = []
    expecting_observation: Step | None = None
    for message in messages:
        role = message["role"]
        if role == "assistant":
            if expecting_observation is not None:
                raise RecordError("roles_out_of_order", "a call has no function result before the next turn")
            thought = _text(message).strip()
            call = message.get("function_call")
            if call is None:
                if thought:
                    pending_thought.append(thought)
                continue
            step = Step(thought="\n\n".join([*pending_thought, thought]).strip(), call=_call(call))
            pending_thought = []
            steps.append(step)
            if step.call.name != FINISH:
                expecting_observation = step
        elif role in ("function", "tool"):
            if expecting_observation is None:
                raise RecordError("roles_out_of_order", "a function result without a call")
            if not isinstance(message.get("content"), str):
                raise RecordError("wrong_type", "function result content is not a string")
            expecting_observation.observation = message["content"]
            expecting_observation = None
        else:
            raise RecordError("roles_out_of_order", f"unexpected {role!r} message inside the trajectory")
    if expecting_observation is not None:
        raise RecordError("roles_out_of_order", "the last call has no function result")
    return steps


def _call(call) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise RecordError("wrong_type", "function_call must have a name")
    raw = call.get("arguments", "{}")
    if isinstance(raw, dict):
        arguments = raw
    elif isinstance(raw, str):
        try:
            arguments = loads(raw) if raw.strip() else {}
        except RecordError as exc:  # too_deep and not_utf8 keep their reason
            reason = "unparseable_arguments" if exc.reason == "invalid_json" else exc.reason
            raise RecordError(reason, f"{call['name']}: {exc.detail}") from None
    else:
        raise RecordError("unparseable_arguments", f"{call['name']}: arguments are {type(raw).__name__}")
    if not isinstance(arguments, dict):
        raise RecordError("unparseable_arguments", f"{call['name']}: arguments are not an object")
    return ToolCall(call["name"], arguments)


def _field(record, key: str, kind: type):
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"expected an object, got {type(record).__name__}")
    if key not in record:
        raise RecordError("missing_field", key)
    value = record[key]
    if not isinstance(value, kind):
        raise RecordError("wrong_type", f"{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _text(message: dict) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise RecordError("wrong_type", f"{message.get('role')} content is not a string")
    return content
