"""Prompts of the negatives job, and the checks every negative answer passes.

Two requests go to the LLM (each a system prompt starting with its marker, then one user message)::

    QUERIES_MARKER  write requests for a case        user: {"scenario", "tools": [{"name", "description"}],
                                                            "count", "batch"}
                    reply {"queries": ["..", ..]}    exactly ``count`` strings
    ANSWER_MARKER   write the assistant's answer     user: {"scenario", "tools": [{"name", "description"}],
                                                            "query"}
                    reply: the answer, plain text

Scenarios: ``no_tools`` (no tool is offered; the request is one a tool would serve: say honestly
what cannot be done, answer what can be) and ``irrelevant_tools`` (tools are offered, the request
does not need them or they cannot serve it: answer normally, without calling). An answer is
rejected (``answer_problem``) for:

    empty            nothing but white space
    call_syntax      a call of any protocol: fenced block, ReAct Action:/Action Input:, JSON or dict
                     call {name, arguments}, tool.func(...), goal:/name:/args: lines, tool_calls
    tool_as_action   an offered tool's name used as an action ("I'll call get_weather", "using X:")
    claimed_action   a claim that an action was performed ("I have booked ...", "I've sent ...")
"""

from __future__ import annotations

import json
import re

from agentflan_ray.aligning.prompts import call_syntax

QUERIES_MARKER = "[agentflan-negative-queries]"
ANSWER_MARKER = "[agentflan-negative-answer]"
PROMPT_VERSION = "negatives-v1"
SCENARIOS = ("no_tools", "irrelevant_tools")

QUERIES_PROMPT = f"""{QUERIES_MARKER} You write realistic user requests for testing an AI assistant.
Input: a scenario, a list of tools (maybe empty), a count and a batch name (other batches ask the same:
make yours different).
- no_tools: requests that would need a tool or an action in the world (booking, looking up live
  data, sending, buying), in the domain of the tools listed if any.
- irrelevant_tools: requests close to the tools' domain that none of the tools can serve, or that
  need no tool at all.
Vary topic, length and tone; one request per string; no numbering.
Reply with JSON {{"queries": [...]}} holding exactly the count of strings."""

ANSWER_PROMPT = f"""{ANSWER_MARKER} Write the assistant's reply to the user's request below.
The assistant can use only the tools listed (none when the list is empty), and none of them fits
this request. Reply in plain prose as a helpful assistant: if the request needs an action or live
data that no listed tool provides, say honestly what you cannot do and help with what you can; else
answer it directly. Never write a tool call, code block, JSON or "Action:" line, never name a listed
tool as something you will use, never claim you did something (booked, sent, bought, checked)."""

PROTOCOL_LINES = re.compile(r"(?im)^\s*(?:goal|name|args|api|params|tool|tool input|function)\s*:\s*\S")
TOOL_CALLS = re.compile(r"""["']?(?:tool_calls|function_call)["']?\s*[:=]""")
CLAIMED = re.compile(
    r"\b(?:I(?:'ve| have)|I just|I've just|I went ahead and|I successfully)\s+(?:\w+\s+){0,2}?"
    r"(?:booked|reserved|sent|emailed|ordered|bought|purchased|scheduled|cancell?ed|transferred|paid|"
    r"checked|looked up|searched|called|queried|retrieved|fetched|submitted|posted|created|updated|deleted)\b|"
    r"\b(?:has|have) been (?:booked|reserved|sent|ordered|scheduled|cancell?ed|transferred|paid|submitted)\b|"
    r"\b(?:your|the) (?:booking|reservation|order|payment|transfer) (?:is|has been) (?:confirmed|complete|placed)\b",
    re.I)


def answer_messages(scenario: str, tools: list[dict], query: str) -> list[dict]:
    user = json.dumps({"scenario": scenario, "tools": tools, "query": query}, ensure_ascii=False,
                      separators=(",", ":"))
    return [{"role": "system", "content": ANSWER_PROMPT}, {"role": "user", "content": user}]


def queries_messages(scenario: str, tools: list[dict], count: int, batch: str = "") -> list[dict]:
    """``batch`` names the request: requests alike in everything else stay distinct (the cache would
    otherwise hand every one the same queries)."""
    user = json.dumps({"scenario": scenario, "tools": tools, "count": count, "batch": batch}, ensure_ascii=False,
                      separators=(",", ":"))
    return [{"role": "system", "content": QUERIES_PROMPT}, {"role": "user", "content": user}]


def tool_names(tools: list[dict]) -> list[str]:
    """Offered names, qualified and bare, longest first."""
    names = set()
    for tool in tools:
        name = str(tool.get("name", ""))
        names.update(n for n in (name, name.rsplit(".", 1)[-1]) if len(n) >= 3)
    return sorted(names, key=len, reverse=True)


def answer_problem(text: str, tools: list[dict]) -> str:
    """The first reason a negative answer is unusable, as ``reason: detail``; "" when it is sound."""
    if not text.strip():
        return "empty: the answer is empty"
    for pattern in (TOOL_CALLS, PROTOCOL_LINES):
        if found := pattern.search(text):
            return f"call_syntax: {found.group(0).strip()!r}"
    if found := call_syntax(text):
        return f"call_syntax: {found!r}"
    for name in tool_names(tools):
        usage = re.search(rf"(?i)\b(?:call|calling|use|using|invoke|invoking|run|running|query|querying)\s+"
                          rf"(?:the\s+)?`?{re.escape(name)}\b", text)
        if usage:
            return f"tool_as_action: {usage.group(0)!r}"
    if found := CLAIMED.search(text):
        return f"claimed_action: {found.group(0)!r}"
    return ""


def queries_problem(content: str, count: int) -> tuple[list[str] | None, str]:
    """``(queries, "")`` for a reply of the right shape, else ``(None, reason: detail)``."""
    try:
        value = json.loads(content)
    except (json.JSONDecodeError, RecursionError):
        return None, "not_json: the reply is not valid JSON"
    queries = value.get("queries") if isinstance(value, dict) else None
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        return None, 'not_an_object: expected {"queries": [strings]}'
    if len(queries) != count:
        return None, f"wrong_count: {count} queries were asked for, the reply has {len(queries)}"
    if any(not q.strip() for q in queries):
        return None, "empty: a query is empty"
    return queries, ""
