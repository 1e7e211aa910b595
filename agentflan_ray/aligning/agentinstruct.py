"""Render an ``EnvTrajectory`` (AgentInstruct) into `agent_instruct_react` and `agent_instruct_tflan`.

`agent_instruct_react` is the trajectory in its original format. `agent_instruct_tflan` moves the
environment description into a system prompt with no format instructions and rewrites each agent
turn as prose plus the action, using the environment's own action syntax::

    os        Think: <t>\\n\\nAct: bash\\n\\n```bash\\n<code>\\n```   ->  <t> I'll run this in the shell:\\n```bash ...
    db        <t>\\nAction: Operation\\n```sql\\n<sql>\\n```       ->  <t> Let me execute this SQL:\\n```sql ...
    alfworld  THOUGHT: <t>\\n ACTION: go to desk 1             ->  <t> So my next action is:\\n```\\ngo to desk 1\\n```
    webshop   Thought:\\n<t>\\n\\nAction:\\nsearch[...]          ->  same, action fenced
    kg        Thought: <t>\\nAction: get_relations(X)         ->  same, action fenced
    mind2web  Thought: <t>\\nAnswer: B.\\nAction: TYPE\\nValue: v  ->  <t> I'll choose option B and TYPE "v".

Final answers (``answer(3)``, ``Final Answer: [..]``, ``Final Answer: #2``) become a plain sentence.
Environment outputs stay user turns, unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentflan_ray.aligning import templates as T
from agentflan_ray.aligning.prompts import Prose, say
from agentflan_ray.aligning.split import rng_for
from agentflan_ray.records import EnvTrajectory, Message, RecordError, Sample


@dataclass(frozen=True)
class EnvAction:
    thought: str
    kind: str  # bash | sql | action | answer | finish | choice | think
    payload: str


OS_TURN = re.compile(r"^\s*(?:Think:\s*(?P<t>.*?)\s*)?Act:\s*(?P<act>bash|finish|answer)\b(?P<rest>.*)\Z", re.S | re.I)
FENCE = re.compile(r"```[a-zA-Z]*\n?(?P<body>.*?)\n?```", re.S)
DB_TURN = re.compile(r"^(?P<t>.*?)\s*Action:\s*(?P<act>Operation|Answer)\s*(?P<rest>.*)\Z", re.S | re.I)
THOUGHT_ACTION = re.compile(r"^\s*(?:THOUGHT:\s*(?P<t>.*?)\s*)?ACTION:\s*(?P<a>.*?)\s*\Z", re.S | re.I)
THOUGHT_ONLY = re.compile(r"^\s*THOUGHT:\s*(?P<t>.*?)\s*\Z", re.S | re.I)
KG_ANSWER = re.compile(r"^\s*(?:Thought:\s*(?P<t>.*?)\s*)?Final Answer:\s*(?P<a>.*?)\s*\Z", re.S | re.I)
MIND2WEB = re.compile(
    r"^\s*(?:Thought:\s*(?P<t>.*?)\s*)?Answer:\s*(?P<ans>[A-Z])\.?\s*(?:Action:\s*(?P<op>[A-Z]+))?\s*(?:Value:\s*(?P<v>.*?))?\s*\Z",
    re.S,
)


def parse_env_action(env: str, text: str) -> EnvAction:
    if env == "os":
        return _parse_os(text)
    if env == "db":
        return _parse_db(text)
    if env == "mind2web":
        match = MIND2WEB.match(text)
        if match:
            choice = match["ans"] + (f" {match['op']}" if match["op"] else "")
            if match["v"] is not None:
                choice += f" {match['v']}"
            return EnvAction((match["t"] or "").strip(), "choice", choice)
        raise RecordError("unparseable_action", f"mind2web: {text[:200]!r}")
    if env == "kg":
        match = KG_ANSWER.match(text)
        if match:
            return EnvAction((match["t"] or "").strip(), "answer", match["a"])
    match = THOUGHT_ACTION.match(text)
    if match and match["a"]:
        return EnvAction((match["t"] or "").strip(), "action", match["a"])
    match = THOUGHT_ONLY.match(text)
    if match and env == "alfworld":
        return EnvAction(match["t"].strip(), "think", "")
    raise RecordError("unparseable_action", f"{env}: {text[:200]!r}")


def _parse_os(text: str) -> EnvAction:
    match = OS_TURN.match(text)
    if not match:
        raise RecordError("unparseable_action", f"os: {text[:200]!r}")
    thought, act, rest = (match["t"] or "").strip(), match["act"].lower(), match["rest"]
    if act == "bash":
        code = FENCE.search(rest)
        if not code:
            raise RecordError("unparseable_action", "os: bash action without a code block")
        return EnvAction(thought, "bash", code["body"])
    if act == "answer":
        answer = re.match(r"\s*\((?P<a>.*)\)\s*\Z", rest, re.S)
        if not answer:
            raise RecordError("unparseable_action", f"os: answer without parentheses: {rest[:100]!r}")
        return EnvAction(thought, "answer", answer["a"])
    return EnvAction(thought, "finish", "")


def _parse_db(text: str) -> EnvAction:
    match = DB_TURN.match(text)
    if not match:
        raise RecordError("unparseable_action", f"db: {text[:200]!r}")
    thought, rest = match["t"].strip(), match["rest"]
    if match["act"].lower() == "operation":
        code = FENCE.search(rest)
        if not code:
            raise RecordError("unparseable_action", "db: operation without a SQL block")
        return EnvAction(thought, "sql", code["body"])
    answer = re.match(r"\s*Final Answer:\s*(?P<a>.*?)\s*\Z", rest, re.S)
    if not answer:
        raise RecordError("unparseable_action", f"db: answer without 'Final Answer:': {rest[:100]!r}")
    return EnvAction(thought, "answer", answer["a"])


def render_env_action(action: EnvAction, rng, thought: str | None = None) -> str:
    thought = action.thought if thought is None else thought
    if action.kind in ("bash", "sql"):
        body = f"{rng.choice(T.ENV_CONNECTIVES[action.kind])}\n```{action.kind}\n{action.payload}\n```"
    elif action.kind == "action":
        body = f"{rng.choice(T.ENV_CONNECTIVES['action'])}\n```\n{action.payload}\n```"
    elif action.kind == "answer":
        body = rng.choice(T.ENV_ANSWERS).format(answer=action.payload)
    elif action.kind == "finish":
        body = rng.choice(T.ENV_FINISH)
    elif action.kind == "choice":
        letter, _, rest = action.payload.partition(" ")
        operation, _, value = rest.partition(" ")
        body = f"I'll choose option {letter}"
        body += f" and {operation} it" if operation and not value else ""
        body += f" and {operation} \"{value}\"" if value else ""
        body += "."
    else:
        body = ""
    return f"{thought} {body}".strip() if thought else body


def split_instruction(env: str, instruction: str) -> str:
    """What of the first user turn is the task itself (the rest is environment and format text)."""
    if env == "mind2web":
        return instruction
    if env == "os":
        _, marker, task = instruction.partition("Now, my problem is:")
        return task.strip() if marker else ""
    return ""


def render_agentinstruct(t: EnvTrajectory, seed: int, streams: list[str]) -> list[Sample]:
    samples = []
    if "agent_instruct_react" in streams:
        samples.append(_sample(t, "agent_instruct_react", [Message(**vars(m)) for m in t.messages]))
    if "agent_instruct_tflan" in streams:
        samples.append(_sample(t, "agent_instruct_tflan", render_env_tflan(t, seed)))
    return samples


def render_env_tflan(t: EnvTrajectory, seed: int, prose: Prose | None = None) -> list[Message]:
    rng = rng_for(seed, t.id, "agent_instruct_tflan")
    messages = [Message("system", T.ENV_SYSTEM[t.env])]
    task = split_instruction(t.env, t.messages[0].content)
    # mind2web has no acknowledgement turn: the first user turn is the task itself.
    body = t.messages[1:] if t.env == "mind2web" else t.messages[2:]
    if task:
        messages.append(Message("user", task))
    elif body and body[0].role != "user":
        raise RecordError("roles_out_of_order", "no task turn after the instruction")
    for step, message in enumerate(body):
        if message.role == "assistant":
            action = parse_env_action(t.env, message.content)
            thought = say(prose, f"s{step}.env_thought", "env_thought", action.thought, step=step) \
                if action.thought else None
            text = render_env_action(action, rng, thought)
            messages.append(Message("assistant", text, loss=message.loss))
        else:
            messages.append(Message(message.role, message.content))
    return messages


def _sample(t: EnvTrajectory, stream: str, messages: list[Message]) -> Sample:
    return Sample(id=f"{t.source}/{t.id}/{stream}", source=t.source, source_id=t.id, stream=stream, messages=messages)
