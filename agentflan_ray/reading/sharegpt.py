"""ShareGPT chats -> ``Conversation`` for the `general` stream."""

from __future__ import annotations

from agentflan_ray.reading.turns import check_alternation, read_turns
from agentflan_ray.records import Conversation, RecordError


def parse_sharegpt(record, source: str, source_id: str) -> Conversation:
    messages = read_turns(record, ("conversations", "conversation", "messages"))
    check_alternation(messages)
    if not any(m.content.strip() for m in messages if m.role == "assistant"):
        raise RecordError("empty_trajectory", "every assistant turn is empty")
    return Conversation(id=source_id, source=source, messages=messages, stream="general")
