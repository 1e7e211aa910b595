"""The record types every stage shares, and the Arrow schemas they are written with.

A source record is parsed into one of three trajectory shapes:

* ``ToolTrajectory``: function-calling trajectories (ToolBench) as steps of
  thought -> call -> observation, with the tool schemas that were offered;
* ``EnvTrajectory``: AgentBench-style environment trajectories (AgentInstruct),
  kept as their original turns plus the environment name;
* ``Conversation``: plain chats (ShareGPT, the Agent-FLAN release) as messages.

Aligning turns a trajectory into ``Sample`` rows; anything that cannot be used
becomes a ``Quarantined`` row with a machine-readable reason. Trajectories cross Ray Data
boundaries (to an LLM stage) as ``TRAJECTORY_SCHEMA`` rows: ``trajectory_to_row`` and
``trajectory_from_row`` are exact inverses (tool schemas and call arguments travel as JSON text).
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

Role = Literal["system", "user", "assistant"]
Capability = Literal["reasoning", "retrieval", "understanding", "instruction_following"]
ROLES = typing.get_args(Role)
CAPABILITIES = typing.get_args(Capability)
# Every stream a sample can be in; each is a folder of a generate output.
STREAMS = ("react", "tflan_cot", "tflan_decomposed", "instruct", "negative", "agent_instruct_react",
           "agent_instruct_tflan", "general", "agentflan")


class RecordError(ValueError):
    """A source record that cannot be used; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    """One chat turn. Records are values: a transform returns a new one (``dataclasses.replace``).
    A role or capability outside the vocabulary is a ``RecordError`` (so a reader that meets one
    quarantines the record with that reason)."""

    role: Role
    content: str
    loss: bool = False
    capability: Capability | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise RecordError("unknown_role", f"role {self.role!r} is not one of {list(ROLES)}")
        if self.capability is not None and self.capability not in CAPABILITIES:
            raise RecordError("unknown_capability", f"capability {self.capability!r} is not one of {list(CAPABILITIES)}")
        if not isinstance(self.content, str):
            raise RecordError("wrong_type", f"content must be a string, got {type(self.content).__name__}")

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content, "loss": self.loss, "capability": self.capability}


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
    # JSON text saying how the prose was written (`rewrite: llm`: model, prompt version, pieces that
    # fell back and why); None for template mode.
    meta: str | None = None

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "source_id": self.source_id,
            "stream": self.stream,
            "messages": [m.to_dict() for m in self.messages],
            "tools": self.tools,
            "meta": self.meta,
        }

    @classmethod
    def from_row(cls, row: dict) -> Sample:
        return cls(row["id"], row["source"], row["source_id"], row["stream"],
                   [Message(**m) for m in row["messages"]], row["tools"], row.get("meta"))

    def __post_init__(self):
        if self.stream not in STREAMS:
            raise ValueError(f"stream {self.stream!r} is not one of {list(STREAMS)}")


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
        ("meta", pa.string()),
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


STEP_TYPE = pa.struct([
    ("thought", pa.string()),
    ("call_name", pa.string()),  # null: no call in this step
    ("call_arguments", pa.string()),  # JSON text of the arguments object
    ("observation", pa.string()),
])

TRAJECTORY_SCHEMA = pa.schema([
    ("kind", pa.string()),  # tool | env | conversation
    ("id", pa.string()),
    ("source", pa.string()),
    ("query", pa.string()),
    ("system", pa.string()),
    ("tools", pa.string()),  # JSON text of the tool schemas
    ("steps", pa.list_(STEP_TYPE)),
    ("final_answer", pa.string()),
    ("env", pa.string()),
    ("stream", pa.string()),
    ("messages", pa.list_(MESSAGE_TYPE)),
])


def trajectory_to_row(t: Trajectory) -> dict:
    row = dict.fromkeys(TRAJECTORY_SCHEMA.names)
    row.update(id=t.id, source=t.source, steps=[], messages=[])
    if isinstance(t, ToolTrajectory):
        row.update(kind="tool", query=t.query, system=t.system, tools=json.dumps(t.tools, ensure_ascii=False),
                   final_answer=t.final_answer,
                   steps=[{"thought": s.thought, "call_name": s.call.name if s.call else None,
                           "call_arguments": json.dumps(s.call.arguments, ensure_ascii=False) if s.call else None,
                           "observation": s.observation} for s in t.steps])
    elif isinstance(t, EnvTrajectory):
        row.update(kind="env", env=t.env, messages=[m.to_dict() for m in t.messages])
    elif isinstance(t, Conversation):
        row.update(kind="conversation", stream=t.stream, messages=[m.to_dict() for m in t.messages])
    else:
        raise TypeError(f"not a trajectory: {type(t).__name__}")
    return row


def trajectory_from_row(row: dict) -> Trajectory:
    messages = [Message(**m) for m in row.get("messages") or []]
    if row["kind"] == "tool":
        steps = [Step(s["thought"], ToolCall(s["call_name"], json.loads(s["call_arguments"]))
                      if s["call_name"] is not None else None, s["observation"]) for s in row["steps"]]
        return ToolTrajectory(row["id"], row["source"], row["query"], row["system"], json.loads(row["tools"]), steps,
                              row["final_answer"])
    if row["kind"] == "env":
        return EnvTrajectory(row["id"], row["source"], row["env"], messages)
    if row["kind"] == "conversation":
        return Conversation(row["id"], row["source"], messages, row["stream"])
    raise ValueError(f"unknown trajectory kind {row['kind']!r}")
