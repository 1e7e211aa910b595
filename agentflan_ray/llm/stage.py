"""Ray Data's side of LLM calls: an async callable class for ``map_batches`` with many requests in
flight per actor, the shared budget, the cache, and a result row per input row (answer or dead
letter, never neither, never both)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pyarrow as pa

from agentflan_ray.config import LLMConfig, StorageConfig
from agentflan_ray.llm.cache import ResponseCache, cache_key
from agentflan_ray.llm.client import FatalLLMError, LLMClient, Secret

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # ok | dead_letter
        ("content", pa.string()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("attempts", pa.int64()),
        ("cached", pa.bool_()),
    ]
)


class ChatStage:
    """``map_batches(ChatStage, fn_constructor_kwargs=..., batch_format="numpy")``: rows whose
    ``request`` (or ``text``, one JSONL line) column is the JSON text ``{id, messages, response_format?}``
    in, ``RESULT_SCHEMA`` rows out."""

    def __init__(self, llm: LLMConfig, cache_uri: str, storage: StorageConfig, budget=None, api_key: Secret | None = None):
        self.llm, self.cache_uri, self.storage, self.budget = llm, cache_uri, storage, budget
        self.api_key = api_key
        self.client = None
        self.cache = None
        self.semaphore = None

    def _setup(self) -> None:
        self.client = LLMClient(self.llm, self.budget, api_key=self.api_key)
        self.cache = ResponseCache(self.cache_uri, self.storage) if self.llm.cache and self.cache_uri else None
        self.semaphore = asyncio.Semaphore(self.llm.concurrency)

    async def __call__(self, batch: dict) -> dict:
        if self.client is None:
            self._setup()
        column = batch["request"] if "request" in batch else batch["text"]  # Parquet or JSONL lines
        requests = [parse_request(text) for text in column.tolist()]
        rows = await asyncio.gather(*(self._one(*request) for request in requests))
        return {name: np.array([row[name] for row in rows], dtype=object) for name in RESULT_SCHEMA.names}

    async def _one(self, row_id: str, messages, response_format) -> dict:
        if isinstance(messages, str):
            return _dead(row_id, messages)
        key = cache_key(self.client.model, messages, self.client.params(response_format), self.llm.prompt_version)
        if self.cache is not None:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                return {**hit, "id": row_id, "attempts": 0, "cached": True}
        async with self.semaphore:
            try:
                completion = await self.client.complete(messages, response_format)
            except FatalLLMError:
                raise
            except Exception as exc:  # noqa: BLE001 - any request failure becomes a dead letter
                return _dead(row_id, self.client.describe_error(exc))
        row = {"id": row_id, "status": "ok", "content": completion.content, "finish_reason": completion.finish_reason,
               "error": "", "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
               "attempts": completion.attempts, "cached": False}
        if self.cache is not None:
            await asyncio.to_thread(self.cache.put, key, {k: v for k, v in row.items() if k not in ("id", "attempts", "cached")})
        return row


def _dead(row_id: str, error: str) -> dict:
    return {"id": row_id, "status": "dead_letter", "content": "", "finish_reason": "", "error": error,
            "prompt_tokens": 0, "completion_tokens": 0, "attempts": 0, "cached": False}


def parse_request(text: str) -> tuple[str, list | str, dict | None]:
    """``(id, messages or an error text, response_format)`` of one JSON request line."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return f"line-{hashlib.sha1(str(text).encode()).hexdigest()[:12]}", "request: not valid JSON", None
    if not isinstance(value, dict):
        return f"line-{hashlib.sha1(str(text).encode()).hexdigest()[:12]}", "request: not a JSON object", None
    row_id = value.get("id")
    if not isinstance(row_id, str | int) or isinstance(row_id, bool) or str(row_id) == "":
        return f"line-{hashlib.sha1(text.encode()).hexdigest()[:12]}", "request: missing id", None
    return str(row_id), _messages(value.get("messages")), _format(value.get("response_format"))


def _messages(value):
    """The request's messages, or an error text when they are unusable (the row is dead-lettered)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return "messages: not valid JSON"
    if not isinstance(value, list) or not value:
        return "messages: expected a non-empty list"
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return "messages: each message needs a role and a string content"
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _format(value):
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) and value else None
