"""The rewrite prompt, and the checks every piece of a reply passes before it enters a sample.

One request per sample: the sample's prose pieces (rendered by the template, see ``Piece``) go
out as a numbered list with the context a writer needs (the query, each step's tool and arguments,
a clipped view of each result; no tool catalogue, no whole observations), and come back as
``{"pieces": [text, ...]}``; compact JSON throughout::

    system   PROMPT (rules, versioned by PROMPT_VERSION; the prompt text is part of the cache key)
    user     {"task": .., "steps": [{"n", "tool", "arguments", "result"}],
              "pieces": [[kind, step n, draft], ...]}
    reply    {"pieces": ["..", ".."]}          exactly one string per piece, in order

Checks (``reply_problems`` for the whole reply, ``piece_problem`` for one piece), each a reason
that is counted when a piece falls back:

    not_json, not_an_object, wrong_piece_count   the reply as a whole (every piece falls back)
    empty            nothing but white space
    call_syntax      a call of any protocol: fenced block, Thought:/Action:/Action Input:,
                     {'name': .., 'parameters': ..}, tool.func(...), <tool_call> tags
    dfsdt_artifact   DFSDT search talk: "previous action", "not the first time", ...
    foreign_tool     a tool name other than the step's own (elicit pieces may name none)
    unsupported_number / unsupported_literal
                     a number or quoted literal that appears nowhere in the piece's source
    missing_fact     a final answer that lost a number of the source answer
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PROMPT_VERSION = "rewrite-v1"
MARKER = "[agentflan-rewrite]"
CLIP = 200  # characters of each argument list and result shown to the writer

KIND_RULES = {
    "thought": "the assistant's reasoning before it calls the step's tool (first person, 1-3 sentences)",
    "connective": "one short sentence saying it now calls the step's tool (the call follows, not yours)",
    "elicit_tool": "the user's short question: which tool will you use? (names no tool)",
    "elicit_arguments": "the user's short question: which arguments does the call need? (names no tool)",
    "final": "the final answer to the user with exactly the draft's facts and figures, no talk of tools",
    "env_thought": "the agent's reasoning before its action in the environment (first person, 1-3 sentences)",
}

PROMPT = f"""{MARKER} Rewrite the prose pieces of an AI agent's trajectory as natural, varied English.
Input: the task, the steps (tool, arguments, clipped result) and "pieces", each [kind, step, draft].
Kinds:
{chr(10).join(f"- {kind}: {rule}" for kind, rule in KIND_RULES.items())}
Rules: prose only, never a tool call, code block, JSON or "Thought:"/"Action:" line (code adds the
calls); no tool but the step's own; no number, date or quoted text absent from the input; nothing
about earlier attempts, retries or "the previous action".
Reply with JSON {{"pieces": [...]}}: one string per piece, in order."""


@dataclass(frozen=True)
class Piece:
    """One prose slot of a rendered sample: its template text is the fallback."""

    key: str  # stable within a sample: "s<step>.<kind>"
    kind: str
    template: str
    tool: str = ""  # the step's own tool (qualified name); "" when the step has none
    step: int = 0  # the step it belongs to (facts come from the steps before it and its own)


def build_messages(context: dict, pieces: list[Piece]) -> list[dict]:
    asked = [[p.kind, p.step + 1, p.template] for p in pieces]
    user = json.dumps({**context, "pieces": asked}, ensure_ascii=False, separators=(",", ":"))
    return [{"role": "system", "content": PROMPT}, {"role": "user", "content": user}]


def clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


RESPONSE_FORMAT = {"type": "json_object"}

FENCE = re.compile(r"```")
PROTOCOL_KEYS = re.compile(r"(?im)^\s*(?:thought|action|action input|observation|final answer|tool input)\s*:|"
                           r"\b(?:action input|action)\s*:")
DICT_CALL = re.compile(r"""[{,]\s*['"](?:name|parameters|arguments|action|action_input|args)['"]\s*:""")
FUNC_CALL = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\s*\(|\b[A-Za-z]\w*_\w+\s*\(")
CALL_TAGS = re.compile(r"<\|?/?(?:tool_call|function|action|plugin)\b|<\|(?:action|plugin)\|>", re.I)
DFSDT = re.compile(
    r"not the first time|previous (?:action|attempt|trail|trial|candidate|step)s?\b|"
    r"(?:based on|given) the (?:current|previous) state|(?:all )?(?:previous|prior) (?:attempts|actions)|"
    r"\b(?:retry|restart)(?:ing)? the task|give up and restart", re.I)
TOOLBENCH_NAME = re.compile(r"\b\w+_for_\w+\b")
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:]\d+)*")
QUOTED = re.compile(r"\"([^\"\n]{1,100})\"|(?<!\w)'([^'\n]{1,100})'(?!\w)|“([^”\n]{1,100})”")


def reply_problems(content: str, count: int) -> tuple[list | None, str]:
    """``(texts, "")`` for a reply of the right shape, else ``(None, reason: detail)``."""
    try:
        value = json.loads(content)
    except (json.JSONDecodeError, RecursionError):
        return None, "not_json: the reply is not valid JSON"
    texts = value.get("pieces") if isinstance(value, dict) else None
    if not isinstance(texts, list):
        return None, 'not_an_object: expected {"pieces": [...]}'
    if len(texts) != count:
        return None, f"wrong_piece_count: {count} pieces were asked for, the reply has {len(texts)}"
    return texts, ""


def call_syntax(text: str) -> str:
    for pattern in (FENCE, PROTOCOL_KEYS, DICT_CALL, FUNC_CALL, CALL_TAGS):
        match = pattern.search(text)
        if match:
            return match.group(0).strip()
    return ""


def piece_problem(text, piece: Piece, facts: str, tool_names: list[str]) -> str:
    """The first problem of one rewritten piece as ``reason: detail``, or ""."""
    if not isinstance(text, str) or not text.strip():
        return "empty: the piece is empty"
    if found := call_syntax(text):
        return f"call_syntax: {found!r}"
    if found := DFSDT.search(text):
        return f"dfsdt_artifact: {found.group(0)!r}"
    own = "" if piece.kind.startswith("elicit") else piece.tool
    own_names = {own, own.rsplit(".", 1)[-1]} - {""}
    for name in tool_names:
        if name not in own_names and name in text:
            return f"foreign_tool: {name!r}"
    for name in TOOLBENCH_NAME.findall(text):
        if name not in own_names and name not in facts:
            return f"foreign_tool: {name!r}"
    for number in NUMBER.findall(text):
        if number not in facts:
            return f"unsupported_number: {number!r}"
    for groups in QUOTED.findall(text):
        literal = next(g for g in groups if g)
        if literal not in facts:
            return f"unsupported_literal: {literal!r}"
    if piece.kind == "final":
        for number in NUMBER.findall(piece.template):
            if number not in text:
                return f"missing_fact: the number {number!r} of the draft is missing"
    return ""


def reason_of(problem: str) -> str:
    return problem.split(":", 1)[0]


class Prose:
    """Where a renderer puts its prose: each piece is recorded, and rendered as its rewrite when one
    was accepted, else as its template text. Renderers take ``prose=None`` (plain template mode)."""

    def __init__(self, rewrites: dict[str, str] | None = None):
        self.rewrites = {} if rewrites is None else rewrites
        self.pieces: list[Piece] = []

    def __call__(self, piece: Piece) -> str:
        self.pieces.append(piece)
        return self.rewrites.get(piece.key, piece.template)


def say(prose: Prose | None, key: str, kind: str, template: str, tool: str = "", step: int = 0) -> str:
    """A renderer's prose slot: the template text, or what ``prose`` puts there."""
    return template if prose is None else prose(Piece(key, kind, template, tool, step))
