"""Chat turns in either of the two public spellings: ``{from, value}`` (ShareGPT, AgentInstruct)
or ``{role, content}`` (OpenAI style, the Agent-FLAN release), with an optional ``loss`` flag."""

from __future__ import annotations

from agentflan_ray.records import Message, RecordError

ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
}


def read_turns(record, keys: tuple[str, ...]) -> list[Message]:
    """Messages of ``record[key]`` for the first key present; ``loss`` defaults to "train on
    assistant turns". Raises ``RecordError`` with a quarantine reason on anything malformed."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"expected an object, got {type(record).__name__}")
    key = next((k for k in keys if k in record), None)
    if key is None:
        raise RecordError("missing_field", " or ".join(keys))
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError("wrong_type", f"{key} must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError("empty_trajectory", f"{key} is empty")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"{key}[{i}] is not an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or speaker.lower() not in ROLE_NAMES:
            raise RecordError("unknown_role", f"{key}[{i}]: role {speaker!r}")
        if not isinstance(text, str):
            raise RecordError("wrong_type", f"{key}[{i}]: text must be a string, got {type(text).__name__}")
        role = ROLE_NAMES[speaker.lower()]
        loss = turn.get("loss")
        if not isinstance(loss, bool):
            loss = role == "assistant"
        messages.append(Message(role, text, loss=loss and role == "assistant"))
    return messages


def check_alternation(messages: list[Message]) -> None:
    """System turns only first, then user and assistant strictly alternating, starting with user
    and ending with assistant."""
    body = messages
    while body and body[0].role == "system":
        body = body[1:]
    if any(m.role == "system" for m in body):
        raise RecordError("roles_out_of_order", "a system turn after the conversation started")
    if not body:
        raise RecordError("empty_trajectory", "no user or assistant turn")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise RecordError("roles_out_of_order", f"turn {i} is {message.role}, expected {expected}")
    if body[-1].role != "assistant":
        raise RecordError("roles_out_of_order", "the conversation does not end with an assistant turn")


def record_id(record, fallback: str) -> str:
    if isinstance(record, dict):
        for key in ("id", "query_id"):
            value = record.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                return str(value)
    return fallback
