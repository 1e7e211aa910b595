"""Evaluation sets: rows ``{id, suite, protocol, messages, tools, expect}`` in JSONL or Parquet.

``messages`` are OpenAI chat messages (the conversation so far), ``tools`` OpenAI tool schemas
(``[{"type": "function", "function": {name, description, parameters}}]``; a JSON string is accepted),
``expect`` is ``"no_call"`` or ``{"name": .., "arguments": {..}}`` (a JSON string is accepted). A case of
suite ``instruct`` also names the protocol its prompt asks for, ``format``: ``json`` or ``goal`` (scored
by format hit, then name, then arguments). Other keys ride along. A row that breaks this is quarantined
with a reason, never fatal.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from agentflan_ray.evaluating.judge import FORMAT_RULES
from agentflan_ray.storage import expand, filesystem, is_s3

ROLES = ("system", "user", "assistant", "tool")


class BadCase(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _json(value, what: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise BadCase("bad_json", f"{what} is a string that is not JSON") from None
    return value


def check_case(row) -> dict:
    """The case as a clean dict, or ``BadCase``."""
    if isinstance(row, str):
        raise BadCase("not_json", row[:100])
    if not isinstance(row, dict):
        raise BadCase("not_an_object", f"a {type(row).__name__}")
    missing = [k for k in ("id", "suite", "protocol", "messages", "expect") if row.get(k) in (None, "")]
    if missing:
        raise BadCase("missing_key", ", ".join(missing))
    messages = _json(row["messages"], "messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content") or "", str) for m in messages):
        raise BadCase("bad_messages", "expected a non-empty list of {role, content}")
    tools = _json(row.get("tools") or [], "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function", t).get("name"), str)
                                              for t in tools):
        raise BadCase("bad_tools", "expected a list of OpenAI tool schemas")
    expect = row["expect"]
    if expect != "no_call":
        expect = _json(expect, "expect")
        if not (isinstance(expect, dict) and isinstance(expect.get("name"), str)
                and isinstance(expect.get("arguments", {}), dict)):
            raise BadCase("bad_expect", 'expected "no_call" or {"name": .., "arguments": {..}}')
    fmt = row.get("format")
    if (row["suite"] == "instruct" or fmt not in (None, "")) and (
            not isinstance(fmt, str) or fmt not in FORMAT_RULES or expect == "no_call"):
        raise BadCase("bad_format", f'an instruct case expects a call in "format": one of {list(FORMAT_RULES)}')
    return {**row, "id": str(row["id"]), "suite": str(row["suite"]), "protocol": str(row["protocol"]),
            "messages": [{"role": m["role"], "content": m.get("content") or ""} for m in messages],
            "tools": [t if "function" in t else {"type": "function", "function": t} for t in tools], "expect": expect}


def tool_names(case: dict) -> list[str]:
    return [t["function"]["name"] for t in case["tools"]]


def read_sets(specs: list[str], storage) -> tuple[list[dict], list[dict], list[str]]:
    """``(cases, quarantined rows, files read)``; cases in file order, then row order."""
    cases, bad, files = [], [], []
    for spec in specs:
        fs, _ = filesystem(spec, storage)
        for path, _, _ in expand(spec, storage):
            files.append(f"s3://{path}" if is_s3(spec) else path)  # as the report names it, and opens it again
            for where, row in _rows(fs, path):
                try:
                    cases.append(check_case(row))
                except BadCase as exc:
                    bad.append({"where": where, "reason": exc.reason, "detail": exc.detail,
                                "row": json.dumps(row, ensure_ascii=False, default=str)[:2000]})
    return cases, bad, files


def _rows(fs, path: str):
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            for i, row in enumerate(pq.read_table(f).to_pylist()):
                yield f"{path}#{i}", row
        return
    with fs.open_input_stream(path) as f:
        for i, line in enumerate(f.read().decode("utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i + 1}", json.loads(line)
            except json.JSONDecodeError:
                yield f"{path}:{i + 1}", line
