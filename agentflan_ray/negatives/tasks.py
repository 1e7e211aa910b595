"""The negatives job's two tasks for the generic LLM stage, and how a case becomes rows.

    QueryTask    one writer request (cases sharing a side, scenario and tool list) -> their queries
    AnswerTask   one training case -> a `negative` sample (system prompt with the offered tools or
                 none, the query, the validated answer, trained on), or a dropped row with the reason

A reply still failing its checks after the re-asks is never fallen back on: a negative with a call
in it is worse than none. The case is dropped and counted by reason.
"""

from __future__ import annotations

import json

import pyarrow as pa

from agentflan_ray.negatives.cases import Case
from agentflan_ray.negatives.prompts import (
    PROMPT_VERSION,
    answer_messages,
    answer_problem,
    queries_messages,
    queries_problem,
)
from agentflan_ray.records import SAMPLE_SCHEMA, Message, Sample

CASE_SCHEMA = pa.schema([("id", pa.string()), ("side", pa.string()), ("scenario", pa.string()),
                         ("query", pa.string()), ("tools", pa.string()), ("query_source", pa.string()),
                         ("tool_source", pa.string()), ("writer_tools", pa.string())])
WRITER_SCHEMA = pa.schema([("ids", pa.list_(pa.string())), ("case", pa.string())])  # the first case, as JSON
RESULT_SCHEMA = pa.unify_schemas([SAMPLE_SCHEMA, pa.schema([("status", pa.string()), ("reason", pa.string()),
                                                            ("scenario", pa.string()), ("query", pa.string())])])
QUERY_RESULT_SCHEMA = pa.unify_schemas([CASE_SCHEMA, pa.schema([("status", pa.string()), ("reason", pa.string())])])
NO_TOOLS_SYSTEM = "You are a helpful assistant."
TOOLS_SYSTEM = "Answer the following questions as best you can. You have access to the following APIs.\n"


def brief(tools: list[dict]) -> list[dict]:
    return [{"name": t["name"], "description": t.get("description", "")[:150]} for t in tools]


def chat_system_prompt(tools: list[dict]) -> str:
    """A plain chat system prompt listing the offered tools (no format instructions), or none."""
    if not tools:
        return NO_TOOLS_SYSTEM
    lines = [TOOLS_SYSTEM] + [f"{t['name']}: {t.get('description', '')}\nInput parameters are as follows: "
                              f"{json.dumps(t.get('parameters', {}), ensure_ascii=False)}\n" for t in tools]
    return "\n".join(lines).rstrip() + "\n"


def reason_of(problem: str) -> str:
    return problem.split(":", 1)[0]


class QueryTask:
    async def rows(self, row: dict, complete) -> list[dict]:
        case, ids = Case.from_row(json.loads(row["case"])), row["ids"]
        count = len(ids)

        def validate(completion) -> str | None:
            return queries_problem(completion.content, count)[1] or None

        completion = await complete(queries_messages(case.scenario, case.writer_tools, count, ids[0]),
                                    {"type": "json_object"}, validate)
        queries, _ = queries_problem(completion.content, count)
        return [{**Case(i, case.side, case.scenario, q.strip(), case.tools, "llm", case.tool_source).to_row(),
                 "status": "ok", "reason": ""} for i, q in zip(ids, queries, strict=True)]

    def failed(self, row: dict, outcome: str, reason: str, detail: str) -> dict:
        case = Case.from_row(json.loads(row["case"]))
        return {**case.to_row(), "id": ",".join(row["ids"]), "status": outcome, "reason": f"{reason}: {detail}"[:500]}


class AnswerTask:
    def __init__(self, model: str):
        self.model = model

    async def rows(self, row: dict, complete) -> list[dict]:
        from agentflan_ray.llm.stage import InvalidReply

        case = Case.from_row(row)

        def validate(completion) -> str | None:
            return answer_problem(completion.content, case.tools) or None

        try:
            completion = await complete(answer_messages(case.scenario, brief(case.tools), case.query), None, validate)
        except InvalidReply as exc:  # dropped, never fallen back on
            last = exc.last
            why = "cut_off" if last is None or last.finish_reason == "length" else \
                reason_of(answer_problem(last.content, case.tools) or "invalid_reply")
            return [{**self._sample(case, ""), "status": "dropped", "reason": why}]
        return [{**self._sample(case, completion.content.strip()), "status": "written", "reason": ""}]

    def failed(self, row: dict, outcome: str, reason: str, detail: str) -> dict:
        case = Case.from_row(row)
        return {**self._sample(case, ""), "status": outcome, "reason": f"{reason}: {detail}"[:500]}

    def _sample(self, case: Case, answer: str) -> dict:
        meta = {"scenario": case.scenario, "query_source": case.query_source, "tool_source": case.tool_source,
                "model": self.model, "prompt_version": PROMPT_VERSION}
        sample = Sample(id=f"negatives/{case.id}/negative", source="negatives", source_id=case.id, stream="negative",
                        messages=[Message("system", chat_system_prompt(case.tools)), Message("user", case.query),
                                  Message("assistant", answer, loss=True)],
                        tools=json.dumps(case.tools, ensure_ascii=False, sort_keys=True),
                        meta=json.dumps(meta, sort_keys=True))
        return {**sample.to_row(), "scenario": case.scenario, "query": case.query}
