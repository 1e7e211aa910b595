"""The simulator's rewrite replies: plausible pieces pass the project's checks, corruptions are caught."""

import hashlib
import json
from collections import Counter

import pytest
from conftest import SIM_KEY

from agentflan_ray.aligning import prompts
from agentflan_ray.aligning.prompts import Piece
from agentflan_ray.llm import sim_rewrite

SEARCH, BACKLINKS = "seo.search_for_seo_api", "seo.backlinks_for_seo_api"
TOOLS = [{"name": SEARCH, "description": "Search results for a query."},
         {"name": BACKLINKS, "description": "The backlinks of a domain."}]
NAMES = [SEARCH, BACKLINKS, "search_for_seo_api", "backlinks_for_seo_api"]  # as aligning.rewrite.tool_names


def tool_request(task: str = "Find the top 25 SEO results for 'best pizza' and report backlinks.") -> list[dict]:
    context = {
        "task": task,
        "steps": [
            {"n": 1, "tool": SEARCH, "arguments": '{"query": "best pizza", "limit": 25}',
             "result": "25 results; top: pizza.com"},
            {"n": 2, "tool": BACKLINKS, "arguments": '{"domain": "pizza.com"}', "result": "1,200 backlinks"},
        ],
    }
    pieces = [
        Piece("s0.thought", "thought", "This is not the first time I try this task. Based on the previous "
              "action, I will call search_for_seo_api with 25 results.", SEARCH, 0),
        Piece("s0.connective", "connective", f"I will call {SEARCH}.", SEARCH, 0),
        Piece("s1.elicit_tool", "elicit_tool", "Which tool do you use next?", BACKLINKS, 1),
        Piece("s1.elicit_arguments", "elicit_arguments", "What arguments?", BACKLINKS, 1),
        Piece("s1.thought", "thought", "Thought: The search returned 25 results. I should check the backlinks "
              "of pizza.com.\nAction: backlinks_for_seo_api", BACKLINKS, 1),
        Piece("s2.final", "final", 'Final Answer: The top result for "best pizza" is pizza.com, with 1,200 '
              "backlinks among 25 results.", "", 2),
    ]
    return prompts.build_messages(context, pieces)


def env_request() -> list[dict]:
    context = {"task": "Put a clean mug in the coffee machine.",
               "steps": [{"n": 1, "action": "go to countertop 2", "result": "You see a mug 1."}]}
    pieces = [Piece("s0.env_thought", "env_thought", "Given the previous state, I go to countertop 2.", "", 0),
              Piece("s1.env_thought", "env_thought", "Thought: I should take mug 1 from countertop 2.", "", 1)]
    return prompts.build_messages(context, pieces)


def digest_of(messages: list[dict]) -> str:  # as the simulator computes it
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def problems(messages: list[dict], content: str, finish: str) -> list[str]:
    """Every reason the project would reject this reply for: length, the reply's shape, or a piece."""
    request = json.loads(messages[1]["content"])
    pieces = sim_rewrite.asked(request)
    found = ["length"] if finish == "length" else []
    texts, problem = prompts.reply_problems(content, len(pieces))
    if texts is None:
        return [*found, problem]
    facts, names = messages[1]["content"], NAMES if request["steps"][0].get("tool") else []
    return found + [p for text, piece in zip(texts, pieces, strict=True)
                    if (p := prompts.piece_problem(text, piece, facts, names))]


@pytest.mark.parametrize("messages", [tool_request(), env_request()], ids=["tool", "env"])
def test_plausible_pieces_pass_every_check(messages):
    content, finish, kind = sim_rewrite.rewrite_reply(messages, digest_of(messages), rate=0.0)
    assert (finish, kind) == ("stop", "")
    assert problems(messages, content, finish) == []
    texts = json.loads(content)["pieces"]
    assert not any(prompts.DFSDT.search(text) or "Thought:" in text for text in texts)
    assert all(text.strip() for text in texts)


def test_plausible_rewrites_follow_the_piece_kind():
    thought, connective, elicit_tool, elicit_arguments, thought2, final = sim_rewrite.plausible(
        json.loads(tool_request()[1]["content"]))
    assert SEARCH in thought and SEARCH in connective  # the DFSDT draft left nothing but the tool
    assert not any(name in elicit_tool + elicit_arguments for name in NAMES)
    assert "25 results" in thought2 and "backlinks_for_seo_api" not in thought2
    assert all(number in final for number in ("25", "1,200")) and not final.startswith("Final Answer")


@pytest.mark.parametrize("kind", sim_rewrite.CORRUPTIONS)
def test_every_corruption_is_caught_by_the_project_checks(kind):
    messages = tool_request()
    request = json.loads(messages[1]["content"])
    content, finish = sim_rewrite.corrupt(request, sim_rewrite.plausible(request), kind)
    assert problems(messages, content, finish), kind


def test_changed_number_inserts_one_when_no_piece_has_a_number():
    messages = env_request()
    request = json.loads(messages[1]["content"])
    pieces = ["I'll walk over there.", "I'll pick it up."]
    content, _ = sim_rewrite.corrupt(request, pieces, "changed_number")
    assert any(p.startswith("unsupported_number") for p in problems(messages, content, "stop"))


def test_foreign_tool_without_other_tools_invents_one():
    messages = env_request()
    request = json.loads(messages[1]["content"])
    content, _ = sim_rewrite.corrupt(request, sim_rewrite.plausible(request), "foreign_tool")
    assert any(p.startswith("foreign_tool") for p in problems(messages, content, "stop"))


def test_replies_are_deterministic():
    first, second = tool_request(), tool_request()
    assert sim_rewrite.rewrite_reply(first, digest_of(first), 0.5) == \
        sim_rewrite.rewrite_reply(second, digest_of(second), 0.5)


def test_corrupted_share_follows_the_rate_and_every_kind_occurs():
    kinds = Counter()
    for i in range(300):
        messages = tool_request(f"Find the top SEO results for pizza place number {i}.")
        content, finish, kind = sim_rewrite.rewrite_reply(messages, digest_of(messages), 0.3)
        kinds[kind] += 1
        assert bool(problems(messages, content, finish)) == bool(kind), (kind, content)
    assert 0.2 <= 1 - kinds[""] / 300 <= 0.4
    assert set(kinds) - {""} == set(sim_rewrite.CORRUPTIONS)


def test_a_reask_is_answered_from_the_original_request():
    messages = tool_request()
    reask = [*messages, {"role": "assistant", "content": "{not json"},
             {"role": "user", "content": "Your reply could not be used: not_json: the reply is not valid JSON. "
                                         "Reply again with one JSON object."}]
    content, _, _ = sim_rewrite.rewrite_reply(reask, digest_of(reask), 0.0)
    assert content == sim_rewrite.rewrite_reply(messages, digest_of(messages), 0.0)[0]
    assert problems(messages, content, "stop") == []


@pytest.mark.parametrize("user", ["not json at all", "[1, 2]", '{"pieces": "none"}', '{"task": 3, "pieces": [7]}'])
def test_requests_of_another_shape_do_not_crash(user):
    messages = [{"role": "system", "content": prompts.PROMPT}, {"role": "user", "content": user}]
    assert sim_rewrite.is_rewrite(messages)
    content, finish, _ = sim_rewrite.rewrite_reply(messages, digest_of(messages), 1.0)
    assert isinstance(content, str) and finish in ("stop", "length")


def test_only_the_rewrite_prompt_is_a_rewrite():
    assert not sim_rewrite.is_rewrite([{"role": "system", "content": "You are helpful."}])
    assert not sim_rewrite.is_rewrite([])


def test_the_server_counts_corrupted_rewrites(simulator):
    from openai import OpenAI

    server, url = simulator(corrupt=1.0)
    messages = tool_request()
    reply = OpenAI(base_url=url, api_key=SIM_KEY, max_retries=0).chat.completions.create(
        model="sim-gpt-4", messages=messages, response_format=prompts.RESPONSE_FORMAT)
    choice = reply.choices[0]
    assert problems(messages, choice.message.content, choice.finish_reason)
    faults = server.stats()["faults"]
    assert sum(n for name, n in faults.items() if name.startswith("corrupt_")) == 1
