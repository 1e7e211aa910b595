"""The held-out Agent-H set: each case rendered under the paper's two protocols.

One JSON row per case and protocol, the format the `eval` job reads::

    {"id", "suite": "agent_h", "protocol": "react" | "general", "messages": [OpenAI chat messages],
     "tools": [OpenAI tool schemas], "expect": "no_call" | {"name", "arguments"},
     "scenario": "no_tools" | "irrelevant_tools" | "positive", "source": ..}

``react``: the system prompt asks for a ReAct format and lists the tools (an empty list when none);
``general``: a plain chat prompt listing the tools. Negatives expect ``no_call``; positive controls
(real ToolBench first calls, tools offered and needed) expect their call, so a model that never
calls anything cannot score well.
"""

from __future__ import annotations

import json

from agentflan_ray.negatives.tasks import chat_system_prompt

REACT_SYSTEM = """Answer the user's request as best you can. You have access to the following tools:
{tools}
Use this format:
Thought: what to do next
Action: the tool to use, one of [{names}]
Action Input: the input to the tool, as JSON
Observation: the result of the action
... (Thought/Action/Action Input/Observation can repeat)
Thought: I now know the final answer
Final Answer: the answer to the user's request"""


def openai_tools(tools: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
            for t in tools]


def system_prompt(protocol: str, tools: list[dict]) -> str:
    if protocol == "react":
        listed = json.dumps([{k: t.get(k) for k in ("name", "description", "parameters")} for t in tools],
                            ensure_ascii=False)
        return REACT_SYSTEM.format(tools=listed, names=", ".join(t["name"] for t in tools))
    return chat_system_prompt(tools)


def rows(case_id: str, scenario: str, query: str, tools: list[dict], expect, source: str) -> list[dict]:
    return [{"id": f"{case_id}/{protocol}", "suite": "agent_h", "protocol": protocol,
             "messages": [{"role": "system", "content": system_prompt(protocol, tools)},
                          {"role": "user", "content": query}],
             "tools": openai_tools(tools), "expect": expect, "scenario": scenario, "source": source}
            for protocol in ("react", "general")]
