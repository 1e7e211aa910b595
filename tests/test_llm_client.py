"""The client, budget, cache and simulator in one process (no Ray)."""

import asyncio
import time

import pytest
from conftest import SIM_KEY

from agentflan_ray.llm.budget import GCRABudget
from agentflan_ray.llm.cache import ResponseCache, cache_key
from agentflan_ray.llm.client import (
    FatalLLMError,
    LLMClient,
    ReplyRejected,
    parse_duration,
    redact,
    retry_hint,
)
from agentflan_ray.llm.settings import LLMConfig

KEY = SIM_KEY


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def client(url, **overrides) -> LLMClient:
    settings = {"base_url": url, "model": "sim-gpt-4", "backoff_initial_s": 0.01, "backoff_max_s": 0.05, **overrides}
    return LLMClient(LLMConfig(**settings))


def run(c: LLMClient, coroutine):
    """Run on the client's own event loop (its connection pool belongs to one loop)."""
    if not hasattr(c, "_test_loop"):
        c._test_loop = asyncio.new_event_loop()
    return c._test_loop.run_until_complete(coroutine)


def ask(c: LLMClient, text: str, **kwargs):
    return run(c, c.complete([{"role": "user", "content": text}], **kwargs))


@pytest.mark.parametrize("value, seconds", [("1.5", 1.5), ("20ms", 0.02), ("6m0s", 360), ("1s", 1), ("", 0), ("soon", 0)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


def test_retry_hint_prefers_milliseconds_then_the_longest():
    assert retry_hint({"retry-after-ms": "250", "retry-after": "3"}) == pytest.approx(0.25)
    assert retry_hint({"retry-after": "1", "x-ratelimit-reset-requests": "2s"}) == pytest.approx(2)


def test_redact_removes_the_key_and_key_like_strings():
    text = f"Incorrect API key provided: {KEY}; also sk-abcdefghijklmnop"
    cleaned = redact(text, [KEY])
    assert KEY not in cleaned and "abcdefghijklmnop" not in cleaned


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_gcra_never_starts_more_than_the_rate_plus_the_burst():
    clock = FakeClock()
    budget = GCRABudget(rpm=600, burst_s=0.5, clock=clock)
    starts = [clock.now + budget.reserve() for _ in range(2000)]  # all asked at once
    in_a_minute = sum(1 for s in starts if s < clock.now + 60)
    assert 600 <= in_a_minute <= 600 + 5 + 1


def test_gcra_tokens_backoff_and_learning():
    clock = FakeClock()
    budget = GCRABudget(tpm=60_000, burst_s=0.0, clock=clock)
    assert budget.reserve(1000) == 0  # 1000 tokens = one second of budget
    assert budget.reserve(1000) == pytest.approx(1.0)
    budget.reconcile(estimated=1000, actual=500)  # the first call used less: half a second back
    assert budget.reserve(10) == pytest.approx(1.5)
    budget.backoff(30)
    assert budget.reserve(0) == pytest.approx(30)
    fresh = GCRABudget(burst_s=0.0, clock=clock)
    assert not fresh.limited
    fresh.learn(rpm=60, tpm=0)
    assert fresh.reserve() == 0 and fresh.reserve() == pytest.approx(1.0)


def test_cache_round_trip_and_keys(tmp_path):
    from agentflan_ray.storage import StorageConfig

    cache = ResponseCache(str(tmp_path / "cache"), StorageConfig())
    messages = [{"role": "user", "content": "hi"}]
    key = cache_key("m", messages, {"temperature": 0.7}, "v1")
    assert key == cache_key("m", list(messages), {"temperature": 0.7}, "v1")
    assert key != cache_key("m", messages, {"temperature": 0.7}, "v2")
    assert key != cache_key("m", messages, {"temperature": 0.2}, "v1")
    assert cache.get(key) is None
    cache.put(key, {"content": "hello"})
    assert cache.get(key) == {"content": "hello"}
    assert (cache.hits, cache.misses) == (1, 1)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_server_faults_are_retried_until_answered(simulator):
    server, url = simulator(error_500=0.2, error_503=0.1, malformed=0.1)
    c = client(url)
    answers = [ask(c, f"<<<ECHO>>>answer {i}<<<END>>>") for i in range(40)]
    assert [a.content for a in answers] == [f"answer {i}" for i in range(40)]  # each its own, none garbled
    stats = server.stats()
    assert stats["status"].get("500", 0) + stats["status"].get("503", 0) > 0 and stats["faults"]["malformed"] > 0
    assert stats["answered"] == 40 and stats["repeated_answers"] == 0


def test_echo_replies_are_exact_and_deterministic(simulator):
    _, url = simulator()
    c = client(url)
    assert ask(c, "rewrite: <<<ECHO>>>The exact text.<<<END>>>").content == "The exact text."
    assert ask(c, "same prompt").content == ask(c, "same prompt").content


def test_retry_after_is_honoured(simulator):
    server, url = simulator(rpm=60, burst_s=1.0)  # one request, then one a second
    c = client(url, backoff_max_s=5)
    ask(c, "first")
    started = time.monotonic()
    ask(c, "second")
    assert time.monotonic() - started >= 0.8
    assert server.stats()["status"]["429"] >= 1


def test_cut_replies_are_re_asked_then_dead_lettered(simulator):
    server, url = simulator(length=1.0)
    c = client(url, max_reasks=2)
    with pytest.raises(ReplyRejected, match="finish_reason is length"):
        ask(c, "never complete")
    assert server.stats()["status"]["200"] == 3


def test_json_replies_are_validated(simulator):
    _, url = simulator()
    c = client(url, max_reasks=1)
    reply = ask(c, "give json", response_format={"type": "json_object"})
    assert reply.content.startswith("{")
    with pytest.raises(ReplyRejected, match="not the JSON"):
        ask(c, "<<<ECHO>>>not json<<<END>>>", response_format={"type": "json_object"})


def test_bad_key_and_unknown_model_are_fatal_and_never_show_the_key(simulator, monkeypatch):
    server, url = simulator()
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-key-abcdefgh")
    bad = LLMClient(LLMConfig(base_url=url, model="sim-gpt-4", api_key_env="WRONG_KEY"))
    for call in (lambda: run(bad, bad.preflight()), lambda: ask(bad, "x")):
        with pytest.raises(FatalLLMError) as info:
            call()
        assert "401" in str(info.value) and "$WRONG_KEY" in str(info.value)
        assert "sk-wrong" not in str(info.value)
    with pytest.raises(FatalLLMError, match="model 'gpt-99'"):
        unknown = client(url, model="gpt-99")
        run(unknown, unknown.preflight())
    assert server.stats()["status"]["401"] == 2


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(FatalLLMError, match=r"\$OPENAI_API_KEY is not set"):
        LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1"))


def test_timeouts_are_retried(simulator):
    server, url = simulator(hang=0.5, hang_s=3)
    c = client(url, timeout_s=0.5, max_attempts=10)
    answers = [ask(c, f"<<<ECHO>>>answer {i}<<<END>>>") for i in range(6)]
    assert [a.content for a in answers] == [f"answer {i}" for i in range(6)]
    assert server.stats()["faults"].get("hang", 0) > 0 and max(a.attempts for a in answers) > 1


WEATHER = {"type": "function", "function": {
    "name": "get_forecast", "description": "Forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "example_value": "Oslo"},
                                                    "days": {"type": "integer"}}, "required": ["city", "days"]}}}


def test_tools_go_natively_and_scripted_calls_come_back_as_tool_calls(simulator):
    _, url = simulator()
    c = client(url)
    script = '<<<ECHO>>><<<TOOL_CALL>>>{"name": "get_forecast", "arguments": {"city": "Paris"}}<<<END>>>'
    native = ask(c, script, tools=[WEATHER])
    assert native.content == "" and native.finish_reason == "tool_calls"
    assert [(call["type"], call["function"]) for call in native.tool_calls] == \
        [("function", {"name": "get_forecast", "arguments": '{"city": "Paris"}'})]
    assert native.tool_calls[0]["id"].startswith("call_")
    as_text = ask(c, script)  # no tools=: the call as the JSON text a model without native tools writes
    assert as_text.content == '{"name": "get_forecast", "arguments": {"city": "Paris"}}' and as_text.tool_calls == []


def test_unscripted_requests_with_tools_call_an_offered_tool_plausibly(simulator):
    _, url = simulator()
    c = client(url)
    replies = [ask(c, f"What will the weather be in Paris, day {i}?", tools=[WEATHER]) for i in range(16)]
    calls = [r.tool_calls[0]["function"] for r in replies if r.tool_calls]
    assert 0 < len(calls) < 16 and all(not r.tool_calls for r in replies if r.content)
    assert all(call == {"name": "get_forecast", "arguments": '{"city": "Oslo", "days": 1}'} for call in calls)


def test_an_endpoint_that_takes_no_tools_is_found_in_one_request(simulator):
    server, url = simulator()
    c = client(url)
    assert run(c, c.accepts_tools())
    rejecting, url = simulator(reject_tools=True)
    c = client(url)
    assert not run(c, c.accepts_tools())
    assert rejecting.stats()["status"] == {"400": 1}
    assert ask(c, "no tools here").content  # without tools= it answers


def test_the_cache_key_holds_the_tools():
    c = LLMClient(LLMConfig(model="m", api_key_env="OPENAI_API_KEY"))
    messages = [{"role": "user", "content": "hi"}]
    assert "tools" not in c.params()  # keys of requests without tools are what they were
    assert cache_key("m", messages, c.params(None, [WEATHER]), "v1") != cache_key("m", messages, c.params(), "v1")
