"""The `tool_call` and `instruct` evaluation suites, built from held-out ToolBench trajectories.

    agentflan-ray eval-sets --generate-manifest out/run1 --output sets.jsonl [--suite tool_call] [--limit N]
    agentflan-ray eval-sets --toolbench "data/toolbench/**/*.json" --output sets.jsonl \
        [--suite tool_call --suite instruct] [--limit N] [--seed S] [--holdout-share F]

Held out: a trajectory is held out when ``aligning/split.py: held_out(seed, id, share)``, its id
given as the `generate` job gives it (the record's id, else its file name and position, relative to
the glob). The `generate` job skips exactly these when its ``eval_holdout`` is that share (and its
``seed`` that seed), and its manifest's ``eval_holdout`` section records seed, share and ToolBench
inputs: ``--generate-manifest <generate output>`` reads them from there so they cannot differ.
Given by hand, ``--seed`` / ``--holdout-share`` must be generate's ``seed`` / ``eval_holdout`` and
``--toolbench`` its ToolBench paths (local or ``s3://``), or the suites overlap the training data.

    tool_call   one case per call of a held-out trajectory (``Finish`` aside, it is the answer): the
                conversation before that call as the `tflan_cot` stream renders it (the aligned system
                prompt listing the tools with no format instructions, the user's query, each earlier
                step as the thought with its call in a small fenced block, its observation as a user
                turn), protocol `general`; ``expect`` is the recorded call (``<tool>.<api>`` name,
                arguments as recorded). Earlier calls are plain text turns, not ``tool_calls`` and
                ``tool`` messages: every OpenAI-compatible endpoint and chat template takes them, with
                or without ``tools=``.
    instruct    one case per held-out trajectory with a call: the `instruct` stream's sample
                (``render_instruct``: one API, the JSON or ``goal:/name:/args:`` protocol, the exact
                call asked for) without its answer; ``format`` (and ``protocol``) is the protocol the
                judge reads in that answer (json or goal), ``expect`` the recorded call it reads back
                (a case whose answer does not parse back is left out as ``parse_back_failed``).

``--limit N`` keeps at most N cases per suite: those with the smallest ``unit_hash(seed, case id,
"eval-pick")`` (a spread over trajectories, the same for the same input), in input order.
"""

from __future__ import annotations

import heapq
import json
import posixpath
from collections import Counter
from collections.abc import Iterator

from agentflan_ray.aligning.split import held_out, unit_hash
from agentflan_ray.aligning.toolbench import qualified_name, render_instruct, render_tflan_cot
from agentflan_ray.config import ConfigError
from agentflan_ray.evaluating.judge import FORMAT_RULES, find_call, same_call
from agentflan_ray.reading.decode import iter_raw_records
from agentflan_ray.reading.parse import parse_record
from agentflan_ray.reading.toolbench import FINISH
from agentflan_ray.reading.turns import record_id
from agentflan_ray.records import RecordError, ToolTrajectory
from agentflan_ray.storage import StorageConfig, filesystem
from agentflan_ray.writing.manifest import read_manifest

SUITES = ("tool_call", "instruct")


def openai_tools(tools: list[dict]) -> list[dict]:
    """ToolBench function schemas as OpenAI tool schemas, named ``<tool>.<api>`` as the aligned
    streams name them; ``Finish`` left out (it is how ToolBench answers, not a tool)."""
    return [{"type": "function", "function": {"name": qualified_name(tool["name"]),
                                              "description": str(tool.get("description", "")),
                                              "parameters": tool.get("parameters") or {"type": "object",
                                                                                      "properties": {}}}}
            for tool in tools if tool.get("name") != FINISH]


def tool_call_cases(t: ToolTrajectory, seed: int) -> list[dict]:
    """One case per call of ``t``: the `tflan_cot` conversation before it, and the call expected."""
    rendered = [{"role": m.role, "content": m.content} for m in render_tflan_cot(t, seed).messages]
    cases = []
    for i, step in enumerate(t.steps):
        if step.call.name == FINISH:
            break
        cases.append({
            "id": f"tool_call/{t.source}/{t.id}/{i}", "suite": "tool_call", "protocol": "general",
            "messages": rendered[: 2 + 2 * i],  # system, query, then (call turn, observation) per earlier step
            "tools": openai_tools(t.tools),
            "expect": {"name": qualified_name(step.call.name), "arguments": step.call.arguments},
            "source": t.source, "source_id": t.id, "step": i,
        })
    return cases


def instruct_case(t: ToolTrajectory, seed: int) -> tuple[dict | None, str]:
    """``(case, "")``, or ``(None, reason)`` when ``t`` has no call or its answer does not parse back
    to one of its recorded calls."""
    sample = render_instruct(t, seed)
    if sample is None:
        return None, "no_call"
    *prompt, answer = sample.messages
    tools = openai_tools(json.loads(sample.tools))
    offered = [tool["function"]["name"] for tool in tools]
    recorded = [{"name": qualified_name(step.call.name), "arguments": step.call.arguments}
                for step in t.steps if step.call.name != FINISH]
    verdict = find_call(answer.content, offered)
    fmt = next((name for name, rule in FORMAT_RULES.items() if rule == verdict.rule), None)
    expect = next((call for call in recorded if same_call(verdict, call, offered) == (True, True)), None)
    if fmt is None or expect is None:
        return None, "parse_back_failed"
    return {"id": f"instruct/{t.source}/{t.id}", "suite": "instruct", "protocol": fmt, "format": fmt,
            "messages": [{"role": m.role, "content": m.content} for m in prompt], "tools": tools,
            "expect": expect, "source": t.source, "source_id": t.id}, ""


def read_toolbench(paths: list[str], storage: StorageConfig, notes: Counter) -> Iterator[ToolTrajectory]:
    """The usable trajectories of ToolBench files (paths, folders or globs, local or ``s3://``), read
    and identified as the `generate` job reads them; records that cannot be used are counted in
    ``notes`` by reason."""
    from agentflan_ray.jobs.generate import GenerateConfig, InputSpec
    from agentflan_ray.reading.plan import plan_read_tasks

    config = GenerateConfig(inputs=[InputSpec("toolbench", path, "toolbench") for path in paths], storage=storage)
    tasks, unmatched = plan_read_tasks(config)
    if unmatched:
        raise FileNotFoundError("--toolbench: " + "; ".join(f"{path} matched no file" for path in unmatched))
    for piece in (piece for task in tasks for piece in task.ranges):
        for raw in iter_raw_records(piece, config):
            if raw.error:
                notes[raw.error] += 1
                continue
            try:
                yield parse_record("toolbench", raw.value, piece.source, record_id(raw.value, raw.where), Counter())
            except RecordError as exc:
                notes[exc.reason] += 1
            except RecursionError:
                notes["too_deep"] += 1


def build_sets(paths: list[str], suites: tuple[str, ...] = SUITES, seed: int = 0, holdout_share: float = 0.05,
               limit: int = 0, storage: StorageConfig | None = None) -> tuple[list[dict], dict]:
    """``(cases, counts)``: the cases of ``suites`` from the held-out trajectories under ``paths``;
    counts of trajectories read, held out, and records or cases left out by reason."""
    notes, dropped = Counter(), Counter()
    kept = {suite: [] for suite in suites}  # per suite a heap of (-pick, order, case): the smallest picks
    read = held = order = 0
    for trajectory in read_toolbench(paths, storage or StorageConfig(), notes):
        read += 1
        if not held_out(seed, trajectory.id, holdout_share):
            continue
        held += 1
        found = tool_call_cases(trajectory, seed) if "tool_call" in suites else []
        if "instruct" in suites:
            case, reason = instruct_case(trajectory, seed)
            found += [case] if case else []
            dropped[f"instruct_{reason}"] += bool(reason)
        for case in found:
            order += 1
            heap = kept[case["suite"]]
            heapq.heappush(heap, (-unit_hash(seed, case["id"], "eval-pick"), order, case))
            if limit and len(heap) > limit:
                heapq.heappop(heap)  # the largest pick goes
    cases = [case for suite in suites for _, _, case in sorted(kept[suite], key=lambda item: item[1])]
    counts = {"trajectories": read, "held_out": held, "cases": dict(Counter(c["suite"] for c in cases)),
              "records_left_out": dict(notes), "cases_left_out": {k: v for k, v in dropped.items() if v}}
    return cases, counts


def write_jsonl(cases: list[dict], output: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(output, storage or StorageConfig())
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        for case in cases:
            out.write((json.dumps(case, ensure_ascii=False, sort_keys=True) + "\n").encode())


def write_sets(toolbench_specs: list[str], output_uri: str, storage: StorageConfig, seed: int, share: float,
               limit: int = 0, suites: tuple[str, ...] = SUITES) -> dict[str, int]:
    """Build the suites from the trajectories `generate` held out with this ``seed`` and ``share`` (its
    ``eval_holdout``) and write them as one JSONL file, local or ``s3://``; the cases per suite."""
    cases, counts = build_sets(toolbench_specs, suites, seed, share, limit, storage)
    write_jsonl(cases, output_uri, storage)
    return {suite: counts["cases"].get(suite, 0) for suite in suites}


def generate_holdout(output: str, storage: StorageConfig) -> dict:
    """The ``eval_holdout`` section (seed, share, toolbench_inputs, counts) of a finished `generate`
    output's manifest; a ConfigError if that run held nothing out (it trained on every trajectory)."""
    section = read_manifest(output, storage, "generate").get("eval_holdout")
    if not section:
        raise ConfigError(f"{output}: the generate run held no ToolBench trajectory out (eval_holdout was 0), "
                          "so every one it read is in its training data; rerun it with eval_holdout set")
    return section
