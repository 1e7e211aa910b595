"""An OpenAI-compatible chat API simulator for tests, demos, benchmarks and dry runs.

    agentflan-ray serve-sim --port 8000 --latency 0.5 --rpm 6000 --error-500 0.05 --malformed 0.02

Serves ``POST /v1/chat/completions`` and ``GET /v1/models`` like the real API, plus ``GET /stats``
(and ``POST /stats/reset``). Rate limits answer 429 with ``Retry-After`` and the
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers; faults are drawn per request.

Replies are deterministic functions of the request: the same messages always get the same text.
A user message holding ``<<<ECHO>>>text<<<END>>>`` is answered with exactly ``text`` (so a pipeline
can be dry-run with replies its validators accept); ``response_format: json_object`` gets a JSON
object; otherwise a short sentence derived from the prompt's hash. A rewrite request (see
``aligning/prompts.py``) gets plausible pieces, a ``--corrupt`` share of them wrong the ways real
models go wrong (``sim_rewrite``; counted as ``corrupt_<kind>`` faults).
A negatives request (``negatives/prompts.py``) likewise gets plausible queries or answers (``sim_negative``).

A request with ``tools=`` (OpenAI tool schemas) may be answered with native ``tool_calls``
(``finish_reason: tool_calls``): an echoed ``<<<TOOL_CALL>>>{"name": .., "arguments": {..}}`` is
exactly that call, and about half the other requests ending with a user turn call an offered tool
(``sim_tools``). ``--reject-tools`` answers any request with ``tools=`` 400, as endpoints without
tool support do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from aiohttp import web

from agentflan_ray.llm import sim_negative, sim_rewrite, sim_tools

ECHO = re.compile(r"<<<ECHO>>>(.*?)<<<END>>>", re.S)


@dataclass
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    latency_s: float = 0.2  # mean reply latency
    latency_jitter: float = 0.25  # latency is uniform within mean * (1 +- jitter)
    rpm: int = 0  # 0: no request limit
    tpm: int = 0  # 0: no token limit
    burst_s: float = 1.0  # a bucket holds this many seconds of the limit
    error_500: float = 0.0
    error_503: float = 0.0
    hang: float = 0.0  # share of requests that hang for hang_s (past a sane client timeout)
    hang_s: float = 30.0
    malformed: float = 0.0  # share answered 200 with a body that is not JSON
    length: float = 0.0  # share cut short with finish_reason "length"
    corrupt: float = 0.0  # share of rewrite and negatives replies made wrong the ways real models go wrong
    api_key: str = ""  # when set, any other key gets 401
    models: list[str] = field(default_factory=lambda: ["sim-gpt-4"])
    seed: int = 0
    context_tokens: int = 0  # when set, a longer prompt gets 400 context_length_exceeded, as real models do
    reject_tools: bool = False  # answer requests with tools= 400, as endpoints without tool support do


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


class Bucket:
    """A token bucket refilled continuously at ``per_minute / 60`` per second."""

    def __init__(self, per_minute: int, burst_s: float):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Take ``amount`` or return the seconds until it would be available (taking nothing)."""
        self._refill()
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def remaining(self) -> int:
        self._refill()
        return int(self.level)


class Simulator:
    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.random = random.Random(config.seed)
        self.requests = Bucket(config.rpm, config.burst_s) if config.rpm else None
        self.tokens = Bucket(config.tpm, config.burst_s) if config.tpm else None
        self.in_flight = 0  # requests being answered now (not reset with the statistics)
        self.connections = lambda: 0  # open client connections; set by whoever runs the app
        self.reset()

    def reset(self) -> None:
        self.status = Counter()
        self.answered = Counter()  # prompt fingerprint -> 200 replies
        self.faults = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.monotonic()
        self.answer_times: list[float] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        return app

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if not self.config.api_key:
            return None
        if request.headers.get("Authorization", "") != f"Bearer {self.config.api_key}":
            return self._error(401, "invalid_api_key", "Incorrect API key provided.")
        return None

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
        self.status[status] += 1
        body = {"error": {"message": message, "type": code, "code": code, "param": None}}
        return web.json_response(body, status=status, headers=headers)

    async def list_models(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulator"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def stats(self, request: web.Request) -> web.Response:
        elapsed = time.monotonic() - self.started
        return web.json_response({
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "faults": dict(self.faults),
            "answered": sum(self.answered.values()),
            "in_flight": self.in_flight,
            "other_connections": max(self.connections() - 1, 0),  # open connections besides this request's
            "unique_prompts_answered": len(self.answered),
            "repeated_answers": sum(n - 1 for n in self.answered.values() if n > 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(elapsed, 3),
            "answer_times": self.answer_times if request.query.get("times") else None,
            "config": {**asdict(self.config), "api_key": "set" if self.config.api_key else ""},
        })

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    def _limit_headers(self) -> dict:
        headers = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining())
                missing = bucket.capacity - bucket.level
                headers[f"x-ratelimit-reset-{name}"] = f"{max(missing, 0) / bucket.rate:.3f}s"
        return headers

    async def chat(self, request: web.Request) -> web.StreamResponse:
        # In flight from the moment the request is handled until it is answered: a client that went
        # away still gets (and is counted) an answer.
        self.in_flight += 1
        try:
            return await self._chat(request)
        finally:
            self.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._auth_error(request)) is not None:
            return denied
        try:
            body = await request.json()
            messages = body["messages"]
            model = body["model"]
            tools = body.get("tools")
            assert isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
            assert tools is None or (isinstance(tools, list) and all(
                isinstance(t, dict) and isinstance((t.get("function") or {}).get("name"), str) for t in tools))
        except Exception:  # noqa: BLE001 - any malformed request is a 400, as the real API does
            return self._error(400, "invalid_request_error", "The request body is not a valid chat completion request.")
        if model not in self.config.models:
            return self._error(404, "model_not_found", f"The model `{model}` does not exist.")
        if tools is not None and self.config.reject_tools:
            return self._error(400, "invalid_request_error", "This model does not support tools.")
        prompt = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if tools:  # the schemas are part of the prompt (and of its tokens), as real APIs count them
            prompt += json.dumps(tools, sort_keys=True, ensure_ascii=False)
        prompt_tokens = estimate_tokens(prompt)
        if self.config.context_tokens and prompt_tokens > self.config.context_tokens:
            return self._error(400, "context_length_exceeded",
                               f"This model's maximum context length is {self.config.context_tokens} tokens. "
                               f"However, your messages resulted in {prompt_tokens} tokens.")
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        for bucket, amount in ((self.requests, 1), (self.tokens, prompt_tokens + max_tokens)):
            if bucket is not None and (wait := bucket.take(amount)) > 0:
                headers = self._limit_headers()
                headers["Retry-After"] = f"{max(wait, 0.001):.3f}"
                headers["retry-after-ms"] = str(int(wait * 1000) + 1)
                return self._error(429, "rate_limit_exceeded", "Rate limit reached; try again later.", headers)

        fault = self._draw_fault()
        latency = self.config.latency_s * (1 + self.random.uniform(-1, 1) * self.config.latency_jitter)
        await asyncio.sleep(max(latency, 0.0))
        if fault == "hang":
            await asyncio.sleep(self.config.hang_s)
        if fault in ("error_500", "error_503"):
            status = 500 if fault == "error_500" else 503
            return self._error(status, "server_error", "The server had an error while processing your request.")
        if fault == "malformed":
            self.status[200] += 1
            return web.Response(text='{"id": "chatcmpl-broken", "choices": [', content_type="application/json")
        return self._reply(body, messages, model, prompt, prompt_tokens, max_tokens, fault == "length")

    def _draw_fault(self) -> str:
        draw = self.random.random()
        for name in ("error_500", "error_503", "hang", "malformed", "length"):
            share = getattr(self.config, name)
            if draw < share:
                self.faults[name] += 1
                return name
            draw -= share
        return ""

    def _reply(self, body, messages, model, prompt, prompt_tokens, max_tokens, cut: bool) -> web.Response:
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        calls = []
        if sim_rewrite.is_rewrite(messages):
            content, finish, corrupted = sim_rewrite.rewrite_reply(messages, digest, self.config.corrupt)
            if corrupted:
                self.faults["corrupt_" + corrupted] += 1
        elif sim_negative.is_negative(messages):
            content, finish, corrupted = sim_negative.negative_reply(messages, digest, self.config.corrupt)
            if corrupted:
                self.faults["corrupt_" + corrupted] += 1
        else:
            content, calls = chat_reply(messages, body.get("response_format"), body.get("tools"), digest)
            finish = "tool_calls" if calls else "stop"
        if cut:
            content, finish = content[: max(1, len(content) // 2)], "length"
            for call in calls:
                call["function"]["arguments"] = call["function"]["arguments"][: len(call["function"]["arguments"]) // 2]
        completion_tokens = min(estimate_tokens(content + json.dumps(calls) if calls else content), max_tokens)
        self.status[200] += 1
        self.answered[digest] += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.answer_times.append(round(time.monotonic() - self.started, 4))
        return web.json_response(
            {
                "id": f"chatcmpl-{digest[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content or None, "tool_calls": calls}
                             if calls else {"role": "assistant", "content": content}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            },
            headers=self._limit_headers(),
        )


def chat_reply(messages: list[dict], response_format, tools: list[dict] | None, digest: str) -> tuple[str, list[dict]]:
    """``(content, tool_calls)`` of an ordinary request (see the module docstring)."""
    text = echoed(messages)
    answer = sim_tools.tool_reply(messages, tools or [], text, digest)
    if answer is not None:
        return answer
    return reply_text(messages, response_format, digest), []


def echoed(messages: list[dict]) -> str | None:
    for message in reversed(messages):
        match = ECHO.search(str(message.get("content") or ""))
        if match:
            return match.group(1)
    return None


def reply_text(messages: list[dict], response_format, digest: str) -> str:
    text = echoed(messages)
    if text is not None:
        return text
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return json.dumps({"answer": f"simulated answer {digest[:8]}", "id": digest[:16]})
    return f"This is a simulated reply ({digest[:8]}) to your request."


async def serve(config: SimulatorConfig, ready: asyncio.Event | None = None) -> None:
    simulator = Simulator(config)
    runner = web.AppRunner(simulator.app(), access_log=None)
    await runner.setup()
    simulator.connections = lambda: len(runner.server.connections)
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class SimulatorServer:
    """The simulator on its own event-loop thread, for tests and benchmarks in one process.

    >>> server = SimulatorServer(SimulatorConfig(port=0, rpm=600)); url = server.start()
    >>> ...; server.stop()
    """

    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.simulator = Simulator(config)
        self.loop = asyncio.new_event_loop()
        self.thread = None
        self.runner = None
        self.base_url = ""

    def start(self) -> str:
        import threading

        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.simulator.app(), access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            self.simulator.connections = lambda: len(self.runner.server.connections)
            site = web.TCPSite(self.runner, self.config.host, self.config.port)
            self.loop.run_until_complete(site.start())
            port = self.runner.addresses[0][1]
            self.base_url = f"http://{self.config.host}:{port}/v1"
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name="llm-simulator")
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError("the simulator did not start")
        return self.base_url

    def stats(self, times: bool = False) -> dict:
        """The /stats document; ``times=True`` adds every answer's time since start."""
        import urllib.request

        query = "?times=1" if times else ""
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/stats" + query, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(10)
