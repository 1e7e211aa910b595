"""The generic LLM stage in one process against the simulator: what happens to each input row is
decided in one place (written, quarantined, dead-lettered, fallback), re-asks are counted, the cache
answers reruns, and a fatal error stops the batch."""

import asyncio

import pyarrow as pa
import pytest

from agentflan_ray.llm.client import FatalLLMError
from agentflan_ray.llm.settings import LLMConfig
from agentflan_ray.llm.stage import BadInput, InvalidReply, LLMStage, strip_bookkeeping
from agentflan_ray.storage import StorageConfig

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("status", pa.string())])


class Task:
    """One input row per behaviour the stage must handle."""

    async def rows(self, row, complete):
        kind = row["kind"]
        ask = [{"role": "user", "content": f"question {row['id']}"}]
        if kind == "bad":
            raise BadInput("bad_row", "no question in it")
        if kind == "none":
            return []
        if kind in ("invalid", "fallback"):
            try:
                reply = await complete(ask, validate=lambda c: "it never passes")
            except InvalidReply:
                if kind == "invalid":
                    raise
                return [{"id": row["id"], "text": "template fallback", "status": "fallback"}]
            return [{"id": row["id"], "text": reply.content, "status": "ok"}]
        reply = await complete(ask)
        copies = 3 if kind == "many" else 1
        return [{"id": row["id"], "text": reply.content, "status": "ok"} for _ in range(copies)]

    def failed(self, row, outcome, reason, detail):
        return {"id": row["id"], "text": f"{reason}: {detail}", "status": outcome}


def stage(url, tmp_path, **llm) -> LLMStage:
    settings = LLMConfig(base_url=url, model="sim-gpt-4", max_reasks=2, backoff_initial_s=0.01, **llm)
    return LLMStage(Task(), SCHEMA, settings, StorageConfig(), cache_uri=str(tmp_path / "cache"))


def batch(*kinds) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"{kind}-{i}", "kind": kind} for i, kind in enumerate(kinds)])


def test_every_input_row_has_one_decided_outcome(simulator, tmp_path):
    server, url = simulator()
    out = asyncio.run(stage(url, tmp_path)(batch("ok", "bad", "invalid", "fallback", "none", "many"))).to_pylist()
    first = {r["id"]: r for r in out if r["_first"]}
    assert {k: (r["_outcome"], r["_reason"]) for k, r in first.items()} == {
        "ok-0": ("written", ""), "bad-1": ("quarantined", "bad_row"), "invalid-2": ("dead_lettered", "invalid_reply"),
        "fallback-3": ("written", ""), "none-4": ("dead_lettered", "no_output"), "many-5": ("written", ""),
    }
    assert first["bad-1"]["text"] == "bad_row: no question in it" and first["fallback-3"]["status"] == "fallback"
    assert "reply rejected after 2 re-asks: it never passes" in first["invalid-2"]["text"]
    # Each failing reply was asked once and re-asked twice, and the usage says so.
    assert (first["invalid-2"]["_requests"], first["invalid-2"]["_reasks"]) == (3, 2)
    assert first["bad-1"]["_requests"] == 0 and first["ok-0"]["_prompt_tokens"] > 0
    assert [r["_first"] for r in out if r["id"] == "many-5"] == [True, False, False]
    assert sum(r["_requests"] for r in out) == server.stats()["status"]["200"] == 1 + 3 + 3 + 1
    assert strip_bookkeeping(pa.Table.from_pylist(out)).column_names == ["id", "text", "status"]


def test_a_rerun_is_answered_from_the_cache(simulator, tmp_path):
    server, url = simulator()
    asyncio.run(stage(url, tmp_path)(batch("ok", "ok", "invalid")))
    asked = server.stats()["status"]["200"]
    again = asyncio.run(stage(url, tmp_path)(batch("ok", "ok", "invalid"))).to_pylist()
    # A reply rejected after its re-asks is stored marked rejected: the rerun decides the same, unasked.
    assert [r["_cached"] for r in again] == [1, 1, 1]
    assert [r["_outcome"] for r in again] == ["written", "written", "dead_lettered"]
    assert [r["_prompt_tokens"] for r in again] == [0, 0, 0]  # nothing paid for this time
    assert server.stats()["status"]["200"] == asked


def test_a_fatal_error_stops_the_batch(simulator, tmp_path, monkeypatch):
    _, url = simulator()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-0000000000")
    with pytest.raises(FatalLLMError, match="401"):
        asyncio.run(stage(url, tmp_path)(batch("ok")))
