"""The simulator's negatives replies: plausible requests and answers pass the project's checks,
corruptions are caught."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import SIM_KEY

from agentflan_ray.llm import sim_negative
from agentflan_ray.negatives import prompts
from agentflan_ray.negatives.prompts import answer_problem, queries_problem

CATALOGUE = json.loads((Path(__file__).parent / "fixtures/teval/api_descrip.json").read_text())


def teval_tools(*toolkits: str) -> list[dict]:
    """The offered tools of these T-Eval toolkits, as the negatives job lists them."""
    return [{"name": f"{kit['name']}.{api['name']}", "description": api["description"]}
            for kit in CATALOGUE if kit["name"] in toolkits for api in kit["api_list"]]


TOOL_SETS = {"none": [], "airbnb": teval_tools("AirbnbSearch"), "email_weather": teval_tools("Email", "Weather"),
             "finance": teval_tools("PolygonFinance")}
QUERIES = ("Book a table for two in Lisbon tonight.", "What's the weather in Oslo tomorrow?",
           "Send my boss the quarterly report.", "Buy me a phone charger.", "Explain compound interest.",
           "What's the difference between weather and climate?", "Write a short poem about my cat.",
           "How do I fix a squeaky door?", "")


def digest_of(messages: list[dict]) -> str:  # as the simulator computes it
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def reply(messages: list[dict], rate: float = 0.0) -> tuple[str, str, str]:
    return sim_negative.negative_reply(messages, digest_of(messages), rate)


def queries_of(scenario: str, tools: list[dict], count: int, seed: str = "") -> list[str]:
    request = {"scenario": scenario, "tools": tools, "count": count}
    return sim_negative.plausible_queries(request, hashlib.sha256(f"{seed}{request}".encode()).hexdigest())


@pytest.mark.parametrize("tools", TOOL_SETS, ids=str)
@pytest.mark.parametrize("scenario", prompts.SCENARIOS)
def test_plausible_answers_pass_every_check(scenario, tools):
    tools = TOOL_SETS[tools]
    for query in (*QUERIES, *queries_of(scenario, tools, 12)):
        messages = prompts.answer_messages(scenario, tools, query)
        content, finish, kind = reply(messages)
        assert (finish, kind) == ("stop", "")
        assert answer_problem(content, tools) == "", (query, content)
        assert not any(tool["name"] in content for tool in tools)


def test_answers_decline_actions_and_answer_the_rest_directly():
    def answer(scenario: str, query: str) -> str:
        return reply(prompts.answer_messages(scenario, TOOL_SETS["finance"], query))[0]

    for query in ("Book a table for two in Lisbon tonight.", "Send my boss the quarterly report."):
        assert any(s in answer("irrelevant_tools", query) for s in (*sim_negative.CANNOT["booking"],
                                                                    *sim_negative.CANNOT["sending"]))
    assert any(s in answer("no_tools", "What's the weather in Oslo?") for s in sim_negative.CANNOT["live"])
    direct = answer("irrelevant_tools", "Explain compound interest.")
    assert not any(s in direct for bank in sim_negative.CANNOT.values() for s in bank)
    assert "Here's a short piece" in answer("irrelevant_tools", "Write a short poem about my cat.")


@pytest.mark.parametrize("count", [1, 5, 12])
@pytest.mark.parametrize("tools", TOOL_SETS, ids=str)
@pytest.mark.parametrize("scenario", prompts.SCENARIOS)
def test_plausible_queries_have_the_count_and_pass_every_check(scenario, tools, count):
    content, finish, kind = reply(prompts.queries_messages(scenario, TOOL_SETS[tools], count))
    queries, problem = queries_problem(content, count)
    assert (problem, finish, kind) == ("", "stop", "")
    assert len(set(queries)) == count


def test_queries_need_a_tool_in_the_tools_domain():
    assert all("weather" in q.lower() for q in queries_of("no_tools", teval_tools("Weather"), 20))
    everyday = queries_of("no_tools", [], 20)
    assert all(sim_negative.intent_of(q) in (*sim_negative.ACTIONS, "live") for q in everyday), everyday
    near = queries_of("irrelevant_tools", teval_tools("Weather"), 40)
    assert 0 < sum("weather" in q.lower() for q in near) < 40  # near the domain, or general


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def near_duplicates(texts: list[str], threshold: float = 0.8) -> int:
    """How many texts a near-duplicate filter would drop: word-3-gram Jaccard >= threshold with an earlier one."""
    kept, dropped = [], 0
    for grams in map(trigrams, texts):
        if any(len(grams & other) >= threshold * len(grams | other) for other in kept):
            dropped += 1
        else:
            kept.append(grams)
    return dropped


def test_queries_are_varied():
    queries, sets = [], list(TOOL_SETS.values())
    for i in range(400):
        scenario = prompts.SCENARIOS[i % 2]
        queries += queries_of(scenario, sets[i // 2 % len(sets)], 5, seed=str(i))
    assert len(queries) == 2000
    assert near_duplicates(queries) < 0.2 * len(queries)


CALLS = ("react_call", "json_call", "python_call", "goal_protocol", "tool_calls")


@pytest.mark.parametrize("kind", sim_negative.ANSWER_CORRUPTIONS)
def test_every_answer_corruption_is_caught(kind):
    for scenario, tools, query in [("no_tools", [], "Book a table for two in Lisbon tonight."),
                                   ("no_tools", TOOL_SETS["airbnb"], "Check the latest property reviews for Oslo."),
                                   ("irrelevant_tools", TOOL_SETS["email_weather"], "Explain compound interest."),
                                   ("irrelevant_tools", TOOL_SETS["finance"], "")]:
        request = {"scenario": scenario, "tools": tools, "query": query}
        answer = sim_negative.plausible_answer(request, "0" * 64)
        content, finish = sim_negative.corrupt_answer(request, answer, kind)
        assert answer_problem(content, tools) or finish == "length", (kind, content)
        assert (finish == "length") == (kind == "cut_off")
        if kind in CALLS and tools:
            assert any(tool["name"] in content for tool in tools), content


def test_a_call_without_offered_tools_names_an_invented_one():
    request = {"scenario": "no_tools", "tools": [], "query": "Send my boss the quarterly report."}
    content, _ = sim_negative.corrupt_answer(request, "", "react_call")
    assert "Action: send_message" in content


@pytest.mark.parametrize("kind", sim_negative.QUERY_CORRUPTIONS)
def test_every_queries_corruption_is_caught(kind):
    for count, tools in [(1, []), (3, TOOL_SETS["airbnb"]), (6, TOOL_SETS["finance"])]:
        request = {"scenario": "no_tools", "tools": tools, "count": count}
        content, finish = sim_negative.corrupt_queries(request, queries_of("no_tools", tools, count), kind)
        queries, problem = queries_problem(content, count)
        assert problem or finish == "length", (kind, content)
        assert (finish == "length") == (kind == "cut_off")


def test_replies_are_deterministic():
    for messages in (prompts.answer_messages("no_tools", TOOL_SETS["airbnb"], "Find me a flat in Porto."),
                     prompts.queries_messages("irrelevant_tools", TOOL_SETS["finance"], 4)):
        assert reply(messages, 0.5) == reply(json.loads(json.dumps(messages)), 0.5)


def test_corrupted_share_follows_the_rate_and_every_kind_occurs():
    answers, queries = Counter(), Counter()
    for i in range(300):
        tools = list(TOOL_SETS.values())[i % len(TOOL_SETS)]
        messages = prompts.answer_messages(prompts.SCENARIOS[i % 2], tools, f"Find a hotel in Porto for {i} nights.")
        content, finish, kind = reply(messages, 0.3)
        assert bool(answer_problem(content, tools) or finish == "length") == bool(kind), (kind, content)
        answers[kind] += 1
        messages = prompts.queries_messages(prompts.SCENARIOS[i % 2], tools, 1 + i // len(TOOL_SETS))
        content, finish, kind = reply(messages, 0.3)
        problem = queries_problem(content, json.loads(messages[1]["content"])["count"])[1]
        assert bool(problem or finish == "length") == bool(kind), (kind, content)
        queries[kind] += 1
    for kinds, corruptions in ((answers, sim_negative.ANSWER_CORRUPTIONS), (queries, sim_negative.QUERY_CORRUPTIONS)):
        assert 0.2 <= 1 - kinds[""] / 300 <= 0.4
        assert set(kinds) - {""} == set(corruptions)


@pytest.mark.parametrize("messages", [
    prompts.answer_messages("irrelevant_tools", TOOL_SETS["finance"], "Book a table for two in Lisbon tonight."),
    prompts.queries_messages("no_tools", TOOL_SETS["airbnb"], 3)], ids=["answer", "queries"])
def test_a_reask_is_answered_from_the_original_request(messages):
    reask = [*messages, {"role": "assistant", "content": "Action: reserve\nAction Input: {}"},
             {"role": "user", "content": "Your reply could not be used: call_syntax: 'Action:'. Write 2 queries "
                                         "about weather instead, in plain prose."}]
    digest = digest_of(reask)
    assert digest != digest_of(messages)  # a re-ask draws anew
    content, finish, kind = sim_negative.negative_reply(reask, digest, 0.0)
    assert (content, finish, kind) == sim_negative.negative_reply(messages, digest, 0.0)
    if sim_negative.is_queries(messages):
        assert len(queries_problem(content, 3)[0]) == 3
    else:
        assert answer_problem(content, TOOL_SETS["finance"]) == ""
        assert any(s in content for s in sim_negative.CANNOT["booking"])


@pytest.mark.parametrize("system", [prompts.ANSWER_PROMPT, prompts.QUERIES_PROMPT], ids=["answer", "queries"])
@pytest.mark.parametrize("user", [
    "not json at all", "[1, 2]", "{}", '{"count": "5", "tools": "none"}', '{"count": true, "scenario": 3}',
    '{"count": -2, "tools": [7, {"name": 3}, {"name": "a-b..c"}, {"name": "..."}], "query": 5}',
    '{"scenario": "irrelevant_tools", "tools": [{"name": "x.y", "description": 4}], "count": 1000000}'])
def test_requests_of_another_shape_do_not_crash(system, user):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    assert sim_negative.is_negative(messages)
    for rate in (0.0, 1.0):
        content, finish, _ = reply(messages, rate)
        assert isinstance(content, str) and finish in ("stop", "length")


def test_a_huge_count_is_capped():
    queries = queries_of("irrelevant_tools", TOOL_SETS["airbnb"], 10**6)
    assert len(queries) == sim_negative.MAX_QUERIES


def test_only_the_negatives_prompts_are_negatives():
    assert not sim_negative.is_negative([{"role": "system", "content": "You are helpful."}])
    assert not sim_negative.is_negative([{"role": "user", "content": prompts.ANSWER_PROMPT}])
    assert not sim_negative.is_negative([])


def test_the_server_counts_corrupted_negatives(simulator):
    from openai import OpenAI

    server, url = simulator(corrupt=1.0)
    client = OpenAI(base_url=url, api_key=SIM_KEY, max_retries=0)
    tools = TOOL_SETS["email_weather"]
    for messages in (prompts.answer_messages("no_tools", tools, "Book a table for two in Lisbon tonight."),
                     prompts.queries_messages("irrelevant_tools", tools, 4)):
        choice = client.chat.completions.create(model="sim-gpt-4", messages=messages).choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        problem = (queries_problem(content, 4)[1] if sim_negative.is_queries(messages)
                   else answer_problem(content, tools))
        assert problem or finish == "length", content
    faults = server.stats()["faults"]
    assert sum(n for name, n in faults.items() if name.startswith("corrupt_")) == 2, faults
