"""Rows of the Agent-FLAN release -> ``Conversation`` kept in the stream its file name implies.

Release rows are ``{id, conversation: [{role, content, loss}]}``; some rows carry ``type`` instead of
``loss`` and some republished copies use ``conversations``. A missing ``loss`` on an assistant turn
means "train on it".
"""

from __future__ import annotations

from agentflan_ray.reading.turns import check_alternation, read_turns
from agentflan_ray.records import Conversation

# Release file name prefixes (row ids start with them) and the stream each one is.
RELEASE_STREAMS = (
    ("toolbench_tflan_cot", "tflan_cot"),
    ("toolbench_tflan", "tflan_decomposed"),
    ("toolbench_react", "react"),
    ("toolbench_instruct", "instruct"),
    ("toolbench_negative", "negative"),
    ("agent_instruct_react", "agent_instruct_react"),
    ("agent_instruct_tflan", "agent_instruct_tflan"),
)


def parse_agentflan(record, source: str, source_id: str) -> Conversation:
    messages = read_turns(record, ("conversation", "conversations"))
    check_alternation(messages)
    return Conversation(id=source_id, source=source, messages=messages, stream=release_stream(source_id))


def release_stream(row_id: str) -> str:
    name = row_id.lower().removeprefix("agentflan_")
    for prefix, stream in RELEASE_STREAMS:
        if name.startswith(prefix):
            return stream
    return "agentflan"
