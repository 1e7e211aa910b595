"""Material from real records, and the cases built from it, for the negatives job.

Material (``material_of``, run in read tasks)::

    ToolBench tree       -> tool_query (its query), tool_list (its functions), positive (query, tools,
                            first call)
    AgentInstruct (os)   -> tool_query (the task: it needs a shell)
    ShareGPT             -> general_query (the first user turn)
    T-Eval api_descrip   -> tool_list (one per tool, its APIs as functions)   (``catalog_tool_lists``)

Cases (``plan_cases``, on the driver, seeded)::

    no_tools          a tool_query, offered no tool              (or an LLM-written one)
    irrelevant_tools  a general_query, offered a real tool list  (or an LLM-written near-domain one)

Every case is destined for one side before it is built: ``train`` (answered, written to the
`negative` stream) or ``agent_h`` (the held-out benchmark). Tool lists are split between the sides
by a seeded hash of their id, so no list is offered on both; queries are deduplicated across both
sides afterwards (exact and near), so no query or near-duplicate is on both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from agentflan_ray.aligning.agentinstruct import split_instruction
from agentflan_ray.aligning.split import unit_hash
from agentflan_ray.aligning.toolbench import qualified_name
from agentflan_ray.reading.toolbench import FINISH
from agentflan_ray.records import Conversation, EnvTrajectory, ToolTrajectory

SIDES = ("agent_h", "train")


@dataclass
class Case:
    id: str
    side: str  # agent_h | train
    scenario: str  # no_tools | irrelevant_tools
    query: str  # "" until an LLM writes it
    tools: list[dict] = field(default_factory=list)  # offered: [{name, description, parameters}]
    query_source: str = ""  # toolbench | agentinstruct | sharegpt | llm
    tool_source: str = ""  # toolbench | teval | "" (none offered)
    writer_tools: list[dict] = field(default_factory=list)  # what an LLM writing the query sees

    def to_row(self) -> dict:
        return {**asdict(self), "tools": json.dumps(self.tools, ensure_ascii=False),
                "writer_tools": json.dumps(self.writer_tools, ensure_ascii=False)}

    @classmethod
    def from_row(cls, row: dict) -> Case:
        return cls(**{**{k: row[k] for k in ("id", "side", "scenario", "query", "query_source", "tool_source")},
                      "tools": json.loads(row["tools"]), "writer_tools": json.loads(row["writer_tools"])})


def function_schema(name: str, description: str, parameters: dict) -> dict:
    return {"name": name, "description": description[:500], "parameters": parameters}


def material_of(trajectory) -> list[dict]:
    """Material rows of one parsed record (``kind`` plus its fields)."""
    if isinstance(trajectory, ToolTrajectory):
        tools = [function_schema(qualified_name(t["name"]), str(t.get("description", "")), t.get("parameters") or {})
                 for t in trajectory.tools if t.get("name") != FINISH]
        rows = [{"kind": "tool_query", "text": trajectory.query, "source": "toolbench", "id": trajectory.id}]
        if tools:
            rows.append({"kind": "tool_list", "tools": tools, "source": "toolbench", "id": trajectory.id})
            first = next((s.call for s in trajectory.steps if s.call and s.call.name != FINISH), None)
            if first is not None:
                rows.append({"kind": "positive", "text": trajectory.query, "tools": tools, "source": "toolbench",
                             "id": trajectory.id, "call": {"name": qualified_name(first.name),
                                                           "arguments": first.arguments}})
        return rows
    if isinstance(trajectory, EnvTrajectory) and trajectory.env == "os":
        task = split_instruction(trajectory.env, trajectory.messages[0].content)
        return [{"kind": "tool_query", "text": task, "source": "agentinstruct", "id": trajectory.id}] if task else []
    if isinstance(trajectory, Conversation) and trajectory.stream == "general":
        first = next((m.content for m in trajectory.messages if m.role == "user"), "")
        if first.strip() and len(first) <= 2000:
            return [{"kind": "general_query", "text": first, "source": "sharegpt", "id": trajectory.id}]
    return []


def catalog_tool_lists(catalog: list) -> list[dict]:
    """T-Eval ``api_descrip.json``: ``[{name, tool_description, api_list: [{name, description,
    required_parameters, optional_parameters}]}]`` -> one tool list per tool."""
    lists = []
    for tool in catalog if isinstance(catalog, list) else []:
        if not isinstance(tool, dict) or not isinstance(tool.get("api_list"), list):
            continue
        functions = []
        for api in tool["api_list"]:
            if not isinstance(api, dict) or not api.get("name"):
                continue
            required = [p for p in api.get("required_parameters") or [] if isinstance(p, dict) and p.get("name")]
            optional = [p for p in api.get("optional_parameters") or [] if isinstance(p, dict) and p.get("name")]
            properties = {p["name"]: {"type": str(p.get("type", "string")).lower(),
                                      "description": str(p.get("description", ""))} for p in required + optional}
            functions.append(function_schema(f"{tool.get('name')}.{api['name']}", str(api.get("description", "")),
                                             {"type": "object", "properties": properties,
                                              "required": [p["name"] for p in required]}))
        if functions:
            lists.append({"kind": "tool_list", "tools": functions, "source": "teval", "id": str(tool.get("name"))})
    return lists


def list_id(tools: list[dict]) -> str:
    return hashlib.sha1(json.dumps(sorted(t["name"] for t in tools)).encode()).hexdigest()[:16]


def side_of_list(tools: list[dict], seed: int, agent_h_share: float) -> str:
    return "agent_h" if unit_hash(seed, list_id(tools), "side") < agent_h_share else "train"


def plan_cases(material: dict[str, list[dict]], targets: dict[tuple[str, str], int], llm_share: float,
               seed: int, agent_h_share: float, per_request: int, held_lists: frozenset = frozenset(),
               prefix: str = "") -> list[Case]:
    """Cases for every (side, scenario) target, oversampled by half so deduplication leaves enough:
    real queries first (each used once), LLM-written ones for ``llm_share`` and for whatever the
    real ones cannot cover (``per_request`` consecutive ones share a tool list, so one request
    writes them together)."""
    def shuffled(rows: list[dict], salt: str) -> list[dict]:
        return sorted(rows, key=lambda r: unit_hash(seed, f"{r['source']}/{r['id']}/{r.get('text', '')[:64]}", salt))

    def side_of(tools: list[dict]) -> str:  # the positive controls' lists are held out too
        return "agent_h" if list_id(tools) in held_lists else side_of_list(tools, seed, agent_h_share)

    lists = {side: [r for r in shuffled(material["tool_list"], "lists") if side_of(r["tools"]) == side]
             for side in SIDES}
    # Real queries are dealt to the sides in proportion to their targets, by a seeded hash of each.
    held_share = sum(n for (side, _), n in targets.items() if side == "agent_h") / max(sum(targets.values()), 1)
    pools = {}
    for scenario, kind in (("no_tools", "tool_query"), ("irrelevant_tools", "general_query")):
        for row in shuffled(material[kind], scenario):
            side = "agent_h" if unit_hash(seed, f"{row['source']}/{row['id']}", "query-side") < held_share else "train"
            pools.setdefault((side, scenario), []).append(row)
    cases: list[Case] = []
    for (side, scenario), target in sorted(targets.items()):
        wanted = target + (target + 1) // 2
        pool = pools.get((side, scenario), [])
        real = min(round(wanted * (1 - llm_share)), len(pool))
        side_lists = lists[side] or ([] if side == "train" else material["tool_list"])
        for i in range(wanted):
            slot = i if i < real else real + (i - real) // per_request
            tool_list = side_lists[slot % len(side_lists)] if side_lists else {"tools": [], "source": ""}
            case_id = f"{side}-{scenario}-{prefix}{i:07d}"
            offered = tool_list["tools"] if scenario == "irrelevant_tools" else []
            if i < real:
                query = pool[i]
                cases.append(Case(case_id, side, scenario, query["text"], offered, query["source"],
                                  tool_list["source"] if offered else ""))
            else:
                cases.append(Case(case_id, side, scenario, "", offered, "llm", tool_list["source"] if offered else "",
                                  writer_tools=[{"name": t["name"], "description": t["description"][:150]}
                                                for t in tool_list["tools"][:8]]))
    return cases
