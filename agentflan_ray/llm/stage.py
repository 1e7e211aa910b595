"""One LLM stage for every job: an async callable class for ``map_batches`` on an actor pool.

The stage owns what every LLM job needs — the client (retries, the cluster-wide budget), the response
cache, re-asks of replies that fail validation, dead letters, usage counts — and takes the job's own
logic as a task object with two methods:

    async rows(row, complete) -> list[dict]   the output rows of one input row; ``complete(messages,
                                              response_format=None, validate=None, strict=True,
                                              tools=None)`` is one validated reply (cached, re-asked,
                                              budgeted; ``tools=`` passed natively)
    failed(row, outcome, reason, detail) -> dict
                                              the row written when an input row is quarantined or
                                              dead-lettered

So chat, rewrite, negatives and eval differ only in their task and prompts. What happens to an
input row is decided here, once:

    rows() returns rows             written (at least one row; none is a dead letter ``no_output``)
    rows() raises BadInput          quarantined with the reason the task gives
    a reply still invalid after ``llm.max_reasks`` re-asks (``InvalidReply``), the task not catching it,
    or a request that failed for good (retries exhausted, HTTP 400)
                                    dead-lettered with the reason
    FatalLLMError (bad key, unknown model)   stops the job

Every output row carries bookkeeping columns (names starting with ``_``, never written): ``_first``
marks the first row of its input row, ``_outcome`` / ``_reason`` say what happened to that input
row, and ``_requests``, ``_cached``, ``_reasks``, ``_prompt_tokens``, ``_completion_tokens`` its usage
(on the first row; tokens only of requests made by this run), so the driver can account for every
input row and every token paid for.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import pyarrow as pa

from agentflan_ray.llm.cache import ResponseCache, cache_key
from agentflan_ray.llm.client import (
    Completion,
    FatalLLMError,
    LLMClient,
    ReplyRejected,
    Secret,
    default_validation,
)
from agentflan_ray.llm.settings import LLMConfig, cost
from agentflan_ray.storage import StorageConfig

USAGE = ("_requests", "_cached", "_reasks", "_prompt_tokens", "_completion_tokens")
BOOKKEEPING = pa.schema([("_first", pa.bool_()), ("_outcome", pa.string()), ("_reason", pa.string()),
                         *[(name, pa.int64()) for name in USAGE]])


class BadInput(ValueError):
    """An input row the task cannot use: quarantined with ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


InvalidReply = ReplyRejected  # a reply still failing validation after the re-asks


@dataclass
class Usage:
    requests: int = 0
    cached: int = 0
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def columns(self) -> dict:
        return dict(zip(USAGE, (self.requests, self.cached, self.reasks, self.prompt_tokens,
                                self.completion_tokens), strict=True))


class LLMStage:
    """``map_batches(LLMStage, fn_constructor_kwargs={"task": ..., "schema": ..., "llm": ..., ...},
    batch_format="pyarrow")``: input rows in, the task's rows (``schema``) plus bookkeeping out."""

    def __init__(self, task, schema: pa.Schema, llm: LLMConfig, storage: StorageConfig, cache_uri: str = "",
                 budget=None, api_key: Secret | None = None):
        self.task, self.llm, self.storage = task, llm, storage
        self.schema = pa.unify_schemas([schema, BOOKKEEPING])  # the task's rows plus bookkeeping
        self.cache_uri, self.budget, self.api_key = cache_uri, budget, api_key
        self.client = self.cache = self.semaphore = None

    def _setup(self) -> None:
        self.client = LLMClient(self.llm, self.budget, api_key=self.api_key)
        self.cache = ResponseCache(self.cache_uri, self.storage) if self.llm.cache and self.cache_uri else None
        self.semaphore = asyncio.Semaphore(self.llm.concurrency)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.client is None:
            self._setup()
        results = await asyncio.gather(*(self._one(row) for row in batch.to_pylist()))
        rows = [row for result in results for row in result]
        return pa.Table.from_pylist(rows, schema=self.schema)

    async def _one(self, row: dict) -> list[dict]:
        usage = Usage()
        complete = functools.partial(self.complete, usage)
        outcome, reason = "written", ""
        try:
            out = await self.task.rows(row, complete)
            if not out:
                outcome, reason = "dead_lettered", "no_output"
                out = [self.task.failed(row, outcome, reason, "the task produced no row")]
        except FatalLLMError:
            raise
        except BadInput as exc:
            outcome, reason = "quarantined", exc.reason
            out = [self.task.failed(row, outcome, exc.reason, exc.detail)]
        except InvalidReply as exc:
            outcome, reason = "dead_lettered", "invalid_reply"
            out = [self.task.failed(row, outcome, reason, str(exc))]
        except Exception as exc:  # noqa: BLE001 - one failed row never stops the job
            outcome, reason = "dead_lettered", failure_reason(exc)
            detail = self.client.describe_error(exc)
            out = [self.task.failed(row, outcome, reason, detail)]
        first = {"_first": True, "_outcome": outcome, "_reason": reason, **usage.columns()}
        rest = {"_first": False, "_outcome": outcome, "_reason": reason, **dict.fromkeys(USAGE, 0)}
        return [{**r, **(first if i == 0 else rest)} for i, r in enumerate(out)]

    async def complete(self, usage: Usage, messages: list[dict], response_format: dict | None = None,
                       validate=None, strict: bool = True, tools: list[dict] | None = None) -> Completion:
        """One reply that passed validation: from the cache, or asked (and re-asked) under the budget."""
        key = cache_key(self.client.model, messages, self.client.params(response_format, tools),
                        self.llm.prompt_version)
        if self.cache is not None:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                completion = Completion(hit["content"], hit["finish_reason"], hit["prompt_tokens"],
                                        hit["completion_tokens"], attempts=0, cached=True,
                                        tool_calls=hit.get("tool_calls") or [])
                wants_json = bool(response_format and response_format.get("type") == "json_object")
                # The same checks as a fresh reply: a stored rejected one may have been cut off.
                problem = (strict and default_validation(completion, wants_json)) or \
                    (validate(completion) if validate else None)
                if not problem:
                    usage.cached += 1  # paid for by an earlier run: no tokens counted
                    return completion
                if hit.get("rejected"):  # rejected after its re-asks last time, and still: not asked again
                    usage.cached += 1
                    raise InvalidReply(f"reply rejected (cached): {problem}", last=completion)
                # else a validator grew stricter since the reply was stored: ask again
        async with self.semaphore:
            try:
                completion = await self.client.complete(messages, response_format, validate=validate, strict=strict,
                                                        tools=tools)
            except ReplyRejected as exc:
                self._count(usage, exc.attempts, exc.reasks, exc.last)
                if exc.last is not None:  # the task may still use parts of it: a rerun must not pay again
                    await self._store(key, exc.last, rejected=str(exc))
                raise
        self._count(usage, completion.attempts, completion.reasks, completion)
        await self._store(key, completion)
        return completion

    @staticmethod
    def _count(usage: Usage, attempts: int, reasks: int, completion: Completion | None) -> None:
        usage.requests += attempts
        usage.reasks += reasks
        if completion is not None:
            usage.prompt_tokens += completion.prompt_tokens
            usage.completion_tokens += completion.completion_tokens

    async def _store(self, key: str, completion: Completion, rejected: str = "") -> None:
        if self.cache is None:
            return
        value = {"content": completion.content, "finish_reason": completion.finish_reason,
                 "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}
        if completion.tool_calls:
            value["tool_calls"] = completion.tool_calls
        if rejected:
            value["rejected"] = rejected
        await asyncio.to_thread(self.cache.put, key, value)


def failure_reason(exc: BaseException) -> str:
    """A short machine-readable dead-letter reason for a request that failed for good."""
    status = getattr(exc, "status_code", None)
    if status:
        return f"http_{status}"
    name = type(exc).__name__
    return {"APITimeoutError": "timeout", "APIConnectionError": "connection_error"}.get(name, "request_failed")


def account_rows(table: pa.Table, tally, source: str) -> int:
    """Count each input row of a stage's output once (at its first output row) in ``tally``: read,
    its outcome and reason, its usage (under ``tally.extra["llm"]``). Returns the input rows counted."""
    columns = table.select(["_first", "_outcome", "_reason", *USAGE]).to_pydict()
    counted = 0
    for i, first in enumerate(columns["_first"]):
        if not first:
            continue
        counted += 1
        tally.read(source)
        tally.outcome(source, columns["_outcome"][i], columns["_reason"][i])
        for name in USAGE:
            tally.extra["llm"][name.lstrip("_")] += columns[name][i]
    return counted


def cost_line(tally, price: dict) -> str:
    """The progress line's detail: tokens and cost so far of the usage ``account_rows`` counted."""
    usage = tally.extra["llm"]
    return f"{usage['prompt_tokens'] + usage['completion_tokens']:,} tokens · ${cost(usage, price):.4f} so far"


def strip_bookkeeping(table: pa.Table) -> pa.Table:
    return table.select([name for name in table.column_names if not name.startswith("_")])
