"""`rewrite: llm`: the LLM writes a sample's prose; code renders everything else, and proves it.

A sample of a chat-aligned stream (``REWRITE_STREAMS``) is first rendered by its template renderer
with a recording ``Prose``: that lists its prose pieces (thoughts, connectives, eliciting user turns,
the final answer) and their template texts. One request asks for all of them (``prompts``); each
piece of the reply is checked against what it may draw on, and the accepted ones are put into the
same renderer, so calls, arguments and observations are rendered by code exactly as in template
mode. The result is parsed back and compared with the source (``verify``)::

    queued trajectory row ──render(Prose())──> pieces ──request──> reply ──piece checks──> accepted
        └────────────────────────render(Prose(accepted))──> sample ──verify──> written
                                                                     └─ fails: the template sample

What is not accepted falls back to its template text, counted by reason in ``meta`` (a JSON column
on the sample) and in the manifest. A trajectory whose request failed for good (dead letter) is
written as its template sample, marked so.
"""

from __future__ import annotations

import json

import pyarrow as pa

from agentflan_ray.aligning.agentinstruct import render_env_tflan
from agentflan_ray.aligning.prompts import (
    PROMPT_VERSION,
    RESPONSE_FORMAT,
    Piece,
    Prose,
    build_messages,
    clip,
    piece_problem,
    reason_of,
    reply_problems,
)
from agentflan_ray.aligning.toolbench import qualified_name, render_tflan_cot, render_tflan_decomposed
from agentflan_ray.aligning.verify import check_env_sample, check_toolbench_sample
from agentflan_ray.reading.toolbench import FINISH
from agentflan_ray.records import (
    TRAJECTORY_SCHEMA,
    Sample,
    ToolTrajectory,
    Trajectory,
    trajectory_from_row,
)

REWRITE_STREAMS = ("tflan_cot", "tflan_decomposed", "agent_instruct_tflan")
QUEUE = "rewrite_queue"  # trajectories waiting for the LLM stage, written by the read tasks
QUEUE_SCHEMA = TRAJECTORY_SCHEMA.append(pa.field("target", pa.string()))  # target: the stream to render


def render(t: Trajectory, target: str, seed: int, prose: Prose | None = None) -> Sample:
    if target == "tflan_cot":
        return render_tflan_cot(t, seed, prose)
    if target == "tflan_decomposed":
        return render_tflan_decomposed(t, seed, prose)
    if target == "agent_instruct_tflan":
        return Sample(id=f"{t.source}/{t.id}/{target}", source=t.source, source_id=t.id, stream=target,
                      messages=render_env_tflan(t, seed, prose))
    raise ValueError(f"stream {target!r} is not rewritten; rewritten streams: {list(REWRITE_STREAMS)}")


class RewriteTask:
    """The LLM stage's task for `rewrite: llm`: one queued trajectory row -> one sample row."""

    def __init__(self, seed: int, model: str):
        self.seed, self.model, self.prompt_version = seed, model, PROMPT_VERSION

    async def rows(self, row: dict, complete) -> list[dict]:
        from agentflan_ray.llm.stage import InvalidReply

        t, target = trajectory_from_row(row), row["target"]
        recorder = Prose()
        template = render(t, target, self.seed, recorder)
        pieces = [p for p in recorder.pieces if p.template.strip()]
        if not pieces:
            return [self._row(template, "template", {}, "no_prose: the sample has no prose to rewrite")]
        facts, names = facts_of(t, pieces), tool_names(t)

        def validate(completion) -> str | None:
            texts, problem = reply_problems(completion.content, len(pieces))
            if problem:
                return problem
            bad = [f"piece {i + 1} ({p.kind}): {why}" for i, (p, text, f) in enumerate(zip(pieces, texts, facts, strict=True))
                   if (why := piece_problem(text, p, f, names))]
            return "; ".join(bad[:5]) or None

        try:
            completion = await complete(build_messages(context_of(t), pieces), RESPONSE_FORMAT, validate)
        except InvalidReply as exc:  # still failing after the re-asks: keep what of it is sound
            completion = exc.last
        accepted, fallbacks = judge(completion, pieces, facts, names)
        if not accepted:
            return [self._row(template, "template", fallbacks)]
        sample = render(t, target, self.seed, Prose(accepted))
        if problems := faithfulness(sample, t, target, self.seed):  # never written as rewritten
            return [self._row(template, "template", dict.fromkeys((p.key for p in pieces), "verify_failed"),
                              f"verify_failed: {problems[0]}")]
        return [self._row(sample, "partial" if fallbacks else "rewritten", fallbacks)]

    def failed(self, row: dict, outcome: str, reason: str, detail: str) -> dict:
        """A trajectory whose request failed for good is written as its template sample."""
        t = trajectory_from_row(row)
        return self._row(render(t, row["target"], self.seed), "template", {}, f"{outcome}: {reason}: {detail}"[:500])

    def _row(self, sample: Sample, status: str, fallbacks: dict, whole: str = "") -> dict:
        meta = {"rewrite": "llm", "model": self.model, "prompt_version": self.prompt_version, "status": status,
                "fallbacks": fallbacks}
        if whole:
            meta["fallback"] = whole
        sample.meta = json.dumps(meta, ensure_ascii=False, sort_keys=True)
        return sample.to_row()


def judge(completion, pieces: list[Piece], facts: list[str], names: list[str]) -> tuple[dict, dict]:
    """``(accepted texts, fallback reasons)`` by piece key."""
    if completion is None:
        return {}, dict.fromkeys((p.key for p in pieces), "no_reply")
    if completion.finish_reason == "length":
        return {}, dict.fromkeys((p.key for p in pieces), "cut_off")
    texts, problem = reply_problems(completion.content, len(pieces))
    if problem:
        return {}, dict.fromkeys((p.key for p in pieces), reason_of(problem))
    accepted, fallbacks = {}, {}
    for piece, text, fact in zip(pieces, texts, facts, strict=True):
        if why := piece_problem(text, piece, fact, names):
            fallbacks[piece.key] = reason_of(why)
        else:
            accepted[piece.key] = text.strip()
    return accepted, fallbacks


def faithfulness(sample: Sample, t: Trajectory, target: str, seed: int) -> list[str]:
    """Parse the rewritten sample back and compare it with the source (empty when faithful)."""
    if isinstance(t, ToolTrajectory):
        return check_toolbench_sample(sample, t, final_rewritten=True)
    actions = render(t, target, seed, Prose(_Blank()))
    return check_env_sample(sample, actions)


class _Blank(dict):
    """Rewrites that leave every thought out: the rendering that is only actions."""

    def get(self, key, default=None):
        return "" if key.endswith(".env_thought") else default


def tool_names(t: Trajectory) -> list[str]:
    """The trajectory's tool names that cannot be mistaken for words (longest first)."""
    if not isinstance(t, ToolTrajectory):
        return []
    names = set()
    for tool in t.tools:
        name = str(tool.get("name", ""))
        if name and name != FINISH:
            names.update(n for n in (name, qualified_name(name)) if "_" in n or "." in n)
    return sorted(names, key=len, reverse=True)


def context_of(t: Trajectory) -> dict:
    """What the writer sees besides the pieces: the task and each step, clipped (each step names its
    own tool; the catalogue of other tools is left out, as they may not be mentioned)."""
    if isinstance(t, ToolTrajectory):
        steps = [{"n": i + 1, "tool": qualified_name(s.call.name),
                  "arguments": clip(json.dumps(s.call.arguments, ensure_ascii=False)), "result": clip(s.observation or "")}
                 for i, s in enumerate(t.steps) if s.call and s.call.name != FINISH]
        return {"task": t.query, "steps": steps}
    body = t.messages[1:] if t.env == "mind2web" else t.messages[2:]
    steps = [{"n": i + 1, ("action" if m.role == "assistant" else "result"): clip(m.content)} for i, m in enumerate(body)]
    return {"task": clip(t.messages[0].content, 1500), "steps": steps}


def facts_of(t: Trajectory, pieces: list[Piece]) -> list[str]:
    """For each piece, the source text its numbers and quoted literals must come from: the task, the
    tools, the earlier steps with their results, its own step's thought and call (a final answer:
    everything, with the source's answer) and its template text."""
    if isinstance(t, ToolTrajectory):
        head = [t.query, json.dumps(t.tools, ensure_ascii=False)]
        calls = [f"{s.thought}\n{json.dumps(s.call.arguments, ensure_ascii=False) if s.call else ''}" for s in t.steps]
        results = [s.observation or "" for s in t.steps]
        answer = t.final_answer
    else:  # an agent turn (thought and action) is the call; the environment's reply the result
        offset = 1 if t.env == "mind2web" else 2
        head, calls, results, answer = [m.content for m in t.messages[:offset]], [], [], ""
        for m in t.messages[offset:]:
            calls.append(m.content if m.role == "assistant" else "")
            results.append("" if m.role == "assistant" else m.content)
    facts = []
    for piece in pieces:
        upto = len(calls) if piece.kind == "final" else piece.step
        parts = [*head, *(f"{c}\n{r}" for c, r in zip(calls[:upto], results[:upto], strict=True))]
        parts += [answer] if piece.kind == "final" else calls[piece.step:piece.step + 1]
        facts.append("\n".join([*parts, piece.template]))
    return facts
