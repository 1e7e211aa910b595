"""The record types every stage shares, and the Arrow schemas they are written with.

A source record is parsed into one of three trajectory shapes:

* ``ToolTrajectory``: function-calling trajectories (ToolBench) as steps of
  thought -> call -> observation, with the tool schemas that were offered;
* ``EnvTrajectory``: AgentBench-style environment trajectories (AgentInstruct),
  kept as their original turns plus the environment name;
* ``Conversation``: plain chats (ShareGPT, the Agent-FLAN release) as messages.

Aligning turns a trajectory into ``Sample`` rows; anything that cannot be used
becomes a ``Quarantined`` row with a machine-readable reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

ROLES = ("system", "user", "assistant")
CAPABILITIES = ("reasoning", "retrieval", "understanding", "instruction_following")
# Every stream a sample can be in; each is a folder of a generate output.
STREAMS = ("react", "tflan_cot", "tflan_decomposed", "instruct", "negative", "agent_instruct_react",
           "agent_instruct_tflan", "general", "agentflan")


@dataclass
class Message:
    role: str
    content: str
    loss: bool = False
    capability: str | None = None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Step:
    """One agent step: a thought, at most one call, and what the call returned."""

    thought: str
    call: ToolCall | None = None
    observation: str | None = None


@dataclass
class ToolTrajectory:
    id: str
    source: str
    query: str
    system: str
    tools: list[dict]
    steps: list[Step]
    final_answer: str


@dataclass
class EnvTrajectory:
    id: str
    source: str
    env: str
    messages: list[Message]


@dataclass
class Conversation:
    id: str
    source: str
    messages: list[Message]
    stream: str = "general"


Trajectory = ToolTrajectory | EnvTrajectory | Conversation


@dataclass
class Sample:
    id: str
    source: str
    source_id: str
    stream: str
    messages: list[Message]
    tools: str = "[]"

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "source_id": self.source_id,
            "stream": self.stream,
            "messages": [asdict(m) for m in self.messages],
            "tools": self.tools,
        }

    @classmethod
    def from_row(cls, row: dict) -> Sample:
        return cls(
            id=row["id"],
            source=row["source"],
            source_id=row["source_id"],
            stream=row["stream"],
            messages=[Message(**m) for m in row["messages"]],
            tools=row["tools"],
        )


@dataclass
class Quarantined:
    source: str
    source_id: str
    reason: str
    detail: str = ""
    path: str = ""
    record: str = ""
    extra: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {
            "source": self.source,
            "source_id": self.source_id,
            "reason": self.reason,
            "detail": self.detail[:2000],
            "path": self.path,
            "record": self.record,
        }


class RecordError(ValueError):
    """A source record that cannot be used; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


MESSAGE_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("loss", pa.bool_()),
        ("capability", pa.string()),
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("stream", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("tools", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("path", pa.string()),
        ("record", pa.string()),
    ]
)


def tools_json(tools: list[dict]) -> str:
    return json.dumps(tools, ensure_ascii=False, sort_keys=True)
