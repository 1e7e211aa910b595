"""AgentInstruct rows (both public schemas) -> ``EnvTrajectory``.

The first user turn is the environment's instruction, the assistant's reply to it is an
acknowledgement ("OK.") that is never trained on, and later user turns are environment outputs.
"""

from __future__ import annotations

import dataclasses
import re

from agentflan_ray.reading.turns import check_alternation, read_turns
from agentflan_ray.records import EnvTrajectory, Message, RecordError

# Recognise the environment from the instruction when the id does not name it.
SIGNATURES = (
    ("os", "linux(ubuntu) operating system"),
    ("db", "operate a MySQL database"),
    ("alfworld", "Interact with a household to solve a task"),
    ("webshop", "You are web shopping"),
    ("kg", "answers questions based on the knowledge stored in a knowledge base"),
    ("mind2web", "Based on the HTML webpage above"),
)
ID_PREFIX = re.compile(r"^(os|db|alfworld|webshop|kg|mind2web)[_-]")
# The action parsers (aligning/agentinstruct.py) put lazy and greedy repeats next to ``\s*``, so their
# time grows with the square of each whitespace run in an agent turn: one run of 40,000 spaces takes
# minutes. A record whose runs add up past this budget (sum of squared lengths; real rows stay under
# 100) is refused before it gets there.
WHITESPACE_RUN = re.compile(r"\s{2,}")
WHITESPACE_BUDGET = 1_000_000


def parse_agentinstruct(record, source: str, source_id: str) -> EnvTrajectory:
    messages = read_turns(record, ("conversations", "conversation"))
    check_alternation(messages)
    check_whitespace(messages)
    if messages[0].role != "user":
        raise RecordError("roles_out_of_order", "AgentInstruct rows start with the instruction")
    env = detect_environment(source_id, messages[0].content)
    if env != "mind2web":
        # The reply to the instruction is the acknowledgement; the paper never trains on it.
        messages[1] = dataclasses.replace(messages[1], loss=False)
        if len(messages) < 4:
            raise RecordError("empty_trajectory", "no agent step after the instruction")
    return EnvTrajectory(id=source_id, source=source, env=env, messages=messages)


def detect_environment(source_id: str, instruction: str) -> str:
    match = ID_PREFIX.match(source_id)
    if match:
        return match.group(1)
    for env, marker in SIGNATURES:
        if marker in instruction:
            return env
    raise RecordError("unknown_environment", "neither the id nor the instruction names an AgentBench environment")


def check_whitespace(messages: list[Message]) -> None:
    cost = 0
    for message in messages:
        if message.role == "assistant":
            cost += sum((run.end() - run.start()) ** 2 for run in WHITESPACE_RUN.finditer(message.content))
    if cost > WHITESPACE_BUDGET:
        raise RecordError("unparseable_action", "agent turns with whitespace runs too long to parse in bounded time")
