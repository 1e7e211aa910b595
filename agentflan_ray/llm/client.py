"""A resilient chat client: ``openai.AsyncOpenAI`` (its own retries off) driven by ``tenacity``.

    retried:     429, 408, 409, 5xx, timeouts, connection errors, unparseable bodies
                 (exponential backoff with jitter, at least as long as Retry-After /
                 retry-after-ms / x-ratelimit-reset-* say)
    dead letter: 400 and 422 (this request is wrong), retries exhausted, replies that keep failing
                 validation after ``max_reasks`` re-asks
    fatal:       401, 403 (the key), 404 (the model or endpoint): the job stops at once

Every request first takes its place in the shared ``RateBudget``; after a 429 the whole fleet
backs off. The API key is read from the environment variable the config names and is scrubbed
from every message this module produces.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import openai
import ray
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from agentflan_ray.llm.settings import LLMConfig

KEY_LIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")
DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")
FATAL_STATUS = {401: "the API rejected the key", 403: "the key may not use this model or endpoint",
                404: "the model or endpoint does not exist"}


class Secret:
    """A credential that can travel to Ray workers but never prints: repr, str and f-strings give ***."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class FatalLLMError(RuntimeError):
    """The job cannot succeed (bad key, unknown model): stop now instead of failing every row."""


class ReplyRejected(Exception):
    """A reply still failing validation after ``max_reasks`` re-asks; ``last`` is that reply (its
    tokens are those of every reply asked for), so a caller can still use what of it is sound."""

    def __init__(self, message: str, attempts: int = 0, reasks: int = 0, last: Completion | None = None):
        super().__init__(message)
        self.attempts, self.reasks, self.last = attempts, reasks, last


REASK = ("Your reply could not be used: {problem}. Reply again to the request above, following its "
         "instructions exactly.")


@dataclass
class Completion:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1  # HTTP requests it took, retries and re-asks included
    cached: bool = False
    reasks: int = 0
    # Native calls of a request made with ``tools=``: ``[{"id", "type": "function", "function": {"name",
    # "arguments" (JSON text)}}]``, plain dicts so they cache and cross Ray as they are.
    tool_calls: list[dict] = field(default_factory=list)


def resolve_endpoint(config: LLMConfig) -> tuple[str | None, str]:
    base_url = config.base_url or os.environ.get("OPENAI_BASE_URL") or None
    model = config.model or os.environ.get("OPENAI_MODEL") or "gpt-4"
    return base_url, model


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return KEY_LIKE.sub(r"\1-***", text)


def parse_duration(value: str | None) -> float:
    """'1.5', '20ms', '6m0s', '1s' -> seconds (0.0 when absent or unreadable)."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    match = DURATION.match(value)
    if not match or not any(match.groups()):
        return 0.0
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def retry_hint(headers) -> float:
    """How long the server asked us to wait, from any of the headers providers use."""
    if headers is None:
        return 0.0
    if headers.get("retry-after-ms"):
        return parse_duration(headers["retry-after-ms"]) / 1000
    hints = [parse_duration(headers.get("retry-after"))]
    hints += [parse_duration(headers.get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")]
    return max(hints)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ReplyRejected | openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    # A 200 with a body that is not JSON surfaces as a decoding or validation error.
    return isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError | ValueError)


def default_validation(completion: Completion, wants_json: bool) -> str | None:
    if completion.finish_reason == "length":
        return "finish_reason is length (the reply was cut off)"
    if not completion.content.strip() and not completion.tool_calls:
        return "empty reply"
    if wants_json:
        try:
            json.loads(completion.content)
        except json.JSONDecodeError:
            return "reply is not the JSON that was asked for"
    return None


class LLMClient:
    def __init__(self, config: LLMConfig, budget=None, validator: Callable[[Completion], str | None] | None = None,
                 api_key: Secret | None = None):
        self.config = config
        self.base_url, self.model = resolve_endpoint(config)
        # The driver reads the key and hands it to workers as a Secret, so workers need no environment.
        self.api_key = api_key.value if api_key is not None else os.environ.get(config.api_key_env, "")
        if not self.api_key:
            raise FatalLLMError(f"${config.api_key_env} is not set; export the API key there (for a local "
                                "simulator or vLLM any non-empty value works)")
        self.client = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0,
                                         timeout=config.timeout_s)
        self.budget = budget
        # Without a configured or announced limit, skip the budget round trip on every request.
        self.limits = {"rpm": config.rpm, "tpm": config.tpm}
        self.validator = validator
        self.learned = False
        self.backoffs = 0

    def params(self, response_format: dict | None = None, tools: list[dict] | None = None) -> dict:
        """The request's settings besides model and messages (part of the cache key)."""
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        if response_format:
            params["response_format"] = response_format
        if tools:
            params["tools"] = tools
        return params

    async def complete(self, messages: list[dict], response_format: dict | None = None,
                       validate: Callable[[Completion], str | None] | None = None, strict: bool = True,
                       tools: list[dict] | None = None) -> Completion:
        """One reply that passes the default checks (not cut off, not empty, JSON when JSON was asked
        for) and ``validate`` (a problem text, or None); a failing reply is re-asked, with the problem
        named, up to ``max_reasks`` times. Raises ``ReplyRejected`` after that, or on a dead letter.
        ``strict=False`` takes any reply as it is (an evaluation scores empty and cut-off replies too).
        ``tools`` (OpenAI tool schemas) are passed as ``tools=``; the reply's calls are ``tool_calls``."""
        wants_json = bool(response_format and response_format.get("type") == "json_object")
        checks = [c for c in (validate, self.validator) if c is not None]
        attempts, asked, problem, tokens = 0, list(messages), "", [0, 0]
        for reask in range(self.config.max_reasks + 1):
            completion = await self._request(asked, response_format, tools)
            attempts += completion.attempts
            tokens[0] += completion.prompt_tokens
            tokens[1] += completion.completion_tokens
            # Every reply asked for is paid for: the one returned carries the tokens of all of them.
            completion.prompt_tokens, completion.completion_tokens = tokens
            completion.attempts, completion.reasks = attempts, reask
            problem = (strict and default_validation(completion, wants_json)) or next(
                (p for p in (check(completion) for check in checks) if p), None)
            if not problem:
                return completion
            asked = [*messages, {"role": "assistant", "content": completion.content},
                     {"role": "user", "content": REASK.format(problem=problem)}]
        raise ReplyRejected(f"reply rejected after {self.config.max_reasks} re-asks: {problem}", attempts,
                            self.config.max_reasks, last=completion)

    async def _request(self, messages: list[dict], response_format: dict | None,
                       tools: list[dict] | None = None) -> Completion:
        estimate = sum(len(str(m.get("content") or "")) for m in messages) // 4 + self.config.max_tokens
        estimate += len(json.dumps(tools)) // 4 if tools else 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda e: is_retryable(e) and not isinstance(e, ReplyRejected)),
            reraise=True,
        )
        attempts = 0
        async for attempt in retrying:
            with attempt:
                attempts += 1
                await self._take_budget(estimate)
                try:
                    raw = await self.client.chat.completions.with_raw_response.create(
                        model=self.model, messages=messages, **self.params(response_format, tools)
                    )
                    self._learn(raw.headers)
                    reply = raw.parse()
                except openai.APIStatusError as exc:
                    if exc.status_code in FATAL_STATUS:
                        raise FatalLLMError(self._fatal_message(exc.status_code)) from None
                    if exc.status_code == 429:
                        self._learn(exc.response.headers if exc.response is not None else {})
                        await self._fleet_backoff(exc.response.headers if exc.response is not None else None)
                    raise
                choice = reply.choices[0]
                usage = reply.usage
                completion = Completion(
                    content=choice.message.content or "",
                    finish_reason=choice.finish_reason or "",
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    attempts=attempts,
                    tool_calls=plain_tool_calls(choice.message.tool_calls),
                )
                if self.budget is not None and usage and self.limits["tpm"]:
                    self.budget.reconcile.remote(estimate, usage.total_tokens)
                return completion
        raise AssertionError("unreachable")

    def _fatal_message(self, status: int) -> str:
        where = self.base_url or "the OpenAI API"
        detail = FATAL_STATUS[status]
        if status == 404:
            detail += f" (model {self.model!r} at {where})"
        else:
            detail += f" (the key in ${self.config.api_key_env}, at {where})"
        return f"HTTP {status}: {detail}; stopping the job"

    def _wait(self, retry_state) -> float:
        backoff = wait_exponential_jitter(initial=self.config.backoff_initial_s, max=self.config.backoff_max_s)(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        response = getattr(exc, "response", None)
        hint = retry_hint(response.headers) if response is not None else 0.0
        return min(max(backoff, hint), self.config.backoff_max_s * 2)

    async def _take_budget(self, tokens: int) -> None:
        if self.budget is None or not (self.limits["rpm"] or self.limits["tpm"] or self.backoffs):
            return
        delay = await self.budget.reserve.remote(tokens)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _fleet_backoff(self, headers) -> None:
        self.backoffs += 1
        if self.budget is not None:
            seconds = retry_hint(headers) or self.config.backoff_initial_s
            await self.budget.backoff.remote(seconds)

    def _learn(self, headers) -> None:
        if self.learned or self.budget is None or not self.config.learn_limits:
            return
        try:
            rpm = int(headers.get("x-ratelimit-limit-requests") or 0)
            tpm = int(headers.get("x-ratelimit-limit-tokens") or 0)
        except ValueError:
            return
        if rpm or tpm:
            self.learned = True
            self.budget.learn.remote(rpm, tpm)
            self.limits = {"rpm": self.limits["rpm"] or rpm, "tpm": self.limits["tpm"] or tpm}

    def describe_error(self, exc: BaseException) -> str:
        """A dead-letter reason: the error's kind and message, never a credential."""
        status = getattr(exc, "status_code", None)
        text = f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {exc}"
        return redact(text, [self.api_key])[:1000]

    async def accepts_tools(self) -> bool:
        """Whether the endpoint takes ``tools=``: one small request offering one tool. HTTP 400 or 422
        means no; a bad key or model stops the job as ``preflight`` does; other failures are retried."""
        try:
            await self._request([{"role": "user", "content": "Reply with the word OK."}], None, [PROBE_TOOL])
        except (openai.BadRequestError, openai.UnprocessableEntityError):
            return False
        return True

    async def preflight(self) -> None:
        """Fail fast on a bad key or unknown model with one cheap call, before any data moves."""
        try:
            models = await self.client.models.list()
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise FatalLLMError(self._fatal_message(exc.status_code)) from None
            return  # some compatible servers have no /models; the first request will tell
        except (openai.APIConnectionError, openai.APITimeoutError):
            raise FatalLLMError(f"cannot reach the API at {self.base_url or 'the OpenAI API'}") from None
        names = {m.id for m in models.data}
        if names and self.model not in names:
            raise FatalLLMError(self._fatal_message(404))


PROBE_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def plain_tool_calls(calls) -> list[dict]:
    """The SDK's tool calls as plain dicts (function calls only; custom tools carry no arguments object)."""
    plain = []
    for call in calls or []:
        function = getattr(call, "function", None)
        if function is not None:
            plain.append({"id": call.id or "", "type": "function",
                          "function": {"name": function.name or "", "arguments": function.arguments or ""}})
    return plain


def ray_remote_error_cause(exc: BaseException) -> BaseException:
    """The innermost cause of an exception that came back through Ray."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
            exc = exc.cause
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc
