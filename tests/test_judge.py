"""The evaluation judge on hand-written replies: every protocol it must read, every reply it must leave
alone, and the comparison with the expected call."""

import json
import random
import time

import pytest

from agentflan_ray.evaluating.judge import (
    FORMAT_RULES,
    MAX_MATCHED,
    Verdict,
    find_call,
    format_call,
    same_call,
)
from agentflan_ray.evaluating.report import markdown, score
from agentflan_ray.llm import sim_negative

OFFERED = ["weather.get_weather", "book_table"]
SKIP = ...  # arguments not checked
PARIS = {"city": "Paris"}


def case(label, reply, name="", rule="", arguments=SKIP, tool_calls=None, offered=OFFERED):
    return pytest.param(reply, name, rule, arguments, tool_calls, offered, id=label)


def native(name, arguments):
    return [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]


TOOL_CALLS = [
    case("tool_calls/json_text", "", "weather.get_weather", "tool_calls", PARIS,
         tool_calls=native("weather.get_weather", '{"city": "Paris"}')),
    case("tool_calls/object_arguments", "Let me check.", "book_table", "tool_calls", {"people": 2},
         tool_calls=native("book_table", {"people": 2})),
    case("tool_calls/before_text_rules", "Action: book_table\nAction Input: {}", "weather.get_weather",
         "tool_calls", PARIS, tool_calls=native("weather.get_weather", json.dumps(PARIS))),
    case("tool_calls/empty_list_then_text", '{"name": "book_table", "arguments": {"people": 3}}',
         "book_table", "json_call", {"people": 3}, tool_calls=[]),
    case("tool_calls/bad_arguments_no_content", None, "weather.get_weather", "tool_calls", None,
         tool_calls=native("weather.get_weather", '{"city": ')),
]

REACT = [
    case("react/thought_action_input",
         'Thought: I need the forecast.\nAction: weather.get_weather\nAction Input: {"city": "Paris"}',
         "weather.get_weather", "react", PARIS),
    case("react/upper_case", 'THOUGHT: first.\nACTION: get_weather\nACTION INPUT: {"city": "Paris"}',
         "get_weather", "react", PARIS),
    case("react/tool_keys", 'Thought: Book it.\nTool: book_table\nTool Input: {"people": 4, "time": "19:00"}',
         "book_table", "react", {"people": 4, "time": "19:00"}),
    case("react/lower_case_python_dict", "thought: go\naction: get_weather\naction input: {'city': 'Paris'}",
         "get_weather", "react", PARIS),
    case("react/plain_text_input", "Thought: search\nAction: web_search\nAction Input: weather in Paris",
         "web_search", "react", None),
    case("react/multi_line_input_then_observation",
         'Action: book_table\nAction Input: {\n  "people": 2,\n  "time": "20:00"\n}\nObservation: booked',
         "book_table", "react", {"people": 2, "time": "20:00"}),
    case("react/markdown_bold",
         '**Thought:** go\n**Action:** get_weather\n**Action Input:** {"city": "Paris"}',
         "get_weather", "react", PARIS),
    case("react/fenced_input", 'Action: get_weather\nAction Input:\n```json\n{"city": "Paris"}\n```',
         "get_weather", "react", PARIS),
    case("react/backticked_name_trailing_text",
         'Action: `get_weather`\nAction Input: {"city": "Paris"} (metric units)', "get_weather", "react",
         PARIS),
    case("react/finish_then_real_action",
         'Action: Finish\nAction Input: {"return_type": "give_up_and_restart"}\n'
         'Thought: retry\nAction: get_weather\nAction Input: {"city": "Paris"}', "get_weather", "react",
         PARIS),
    case("react/simulator_corruption",
         'Thought: I should look this up first.\nAction: book_table\nAction Input: {"query": "a table"}',
         "book_table", "react", {"query": "a table"}),
]

JSON_CALLS = [
    case("json/bare", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "get_weather", "json_call",
         PARIS),
    case("json/fenced_after_prose",
         'Sure, here you go.\n\n```json\n{"name": "book_table", "arguments": {"people": 2}}\n```',
         "book_table", "json_call", {"people": 2}),
    case("json/python_fence_single_quotes",
         "```python\n{'name': 'weather.get_weather', 'parameters': {'city': 'Paris', 'metric': True}}\n```",
         "weather.get_weather", "json_call", {"city": "Paris", "metric": True}),
    case("json/plain_fence_indented", '```\n  {"tool": "book_table", "args": {"people": 5}}\n```',
         "book_table", "json_call", {"people": 5}),
    case("json/arguments_as_json_text", '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
         "get_weather", "json_call", PARIS),
    case("json/langchain_text_input", 'I will search.\n{"action": "web_search", "action_input": "Paris"}',
         "web_search", "json_call", None),
    case("json/instruct_goal_tool_param",
         '{\n    "goal": "Know the weather",\n    "Tool": "weather.get_weather",\n'
         '    "Param": {"city": "Paris"}\n}',
         "weather.get_weather", "json_call", PARIS),
    case("json/instruct_thought_name_args",
         '{"thought": "book", "name": "book_table", "args": {"people": 2}}', "book_table", "json_call",
         {"people": 2}),
    case("json/instruct_plan_api_name_parameters",
         '{"plan": "forecast", "api_name": "weather.get_weather", "parameters": {"city": "Paris"}}',
         "weather.get_weather", "json_call", PARIS),
    case("json/instruct_reason_action_input",
         '{"reason": "forecast", "action": "get_weather", "action_input": {"city": "Paris"}}',
         "get_weather", "json_call", PARIS),
    case("json/react_cot_command_actioninput",
         '{"cot": "forecast", "command": "get_weather", "ActionInput": {"city": "Paris"}}',
         "get_weather", "json_call", PARIS),
    case("json/react_innerthought_action_parameters",
         '{"InnerThought": "go", "Action": "book_table", "Parameters": {"people": 6}}', "book_table",
         "json_call", {"people": 6}),
    case("json/upper_case_keys", '{"NAME": "book_table", "ARGUMENTS": {"people": 1}}', "book_table",
         "json_call", {"people": 1}),
    case("json/tool_calls_fragment_in_text",
         'I can help.\n"tool_calls": [{"id": "call_1", "type": "function", "function": '
         '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]', "get_weather", "json_call",
         PARIS),
    case("json/list_of_calls", '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
         '{"name": "book_table", "arguments": {"people": 2}}]', "get_weather", "json_call", PARIS),
    case("json/python_dict_none_value",
         "Calling {'function': 'book_table', 'params': {'people': 2, 'note': None}}",
         "book_table", "json_call", {"people": 2, "note": None}),
    case("json/finish_skipped_for_next",
         '{"name": "Finish", "arguments": {}} {"name": "get_weather", "arguments": {"city": "Paris"}}',
         "get_weather", "json_call", PARIS),
    case("json/hermes_tool_call_tags",
         '<tool_call>\n{"name": "book_table", "arguments": {"people": 2}}\n</tool_call>', "book_table",
         "json_call", {"people": 2}),
    case("json/mistral_tool_calls_marker",
         '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "get_weather", "json_call",
         PARIS),
]

PYTHON_CALLS = [
    case("python/simulator_invented",
         "Let me check that for you.\ntools.search_flights(query='Lisbon to Oslo')", "tools.search_flights",
         "python_call", {"query": "Lisbon to Oslo"}, offered=[]),
    case("python/dotted_offered", 'weather.get_weather(city="Paris")', "weather.get_weather", "python_call",
         PARIS),
    case("python/bare_form_of_qualified", 'I will run get_weather(city="Paris") now.', "get_weather",
         "python_call", PARIS),
    case("python/qualifier_on_bare_offered", "tools.book_table(people=2)", "tools.book_table", "python_call",
         {"people": 2}),
    case("python/offered_in_fence", '```python\nforecast = get_weather(city="Paris")\nprint(forecast)\n```',
         "get_weather", "python_call", PARIS),
    case("python/positional", 'get_weather("Paris")', "get_weather", "python_call", None),
    case("python/empty_parens_alone", "Checking now:\n`get_weather()`", "get_weather", "python_call", {}),
    case("python/inline_invented", 'I would send `send_email(to="ana@example.com", subject="Hi")` for you.',
         "send_email", "python_call", {"to": "ana@example.com", "subject": "Hi"}),
    case("python/multi_line", 'book_table(\n    people=4,\n    time="19:00",\n)', "book_table", "python_call",
         {"people": 4, "time": "19:00"}),
    case("python/non_literal_value", "get_weather(city=Paris)", "get_weather", "python_call", None),
    case("python/set_argument_is_no_json", "tag_photos(tags={'sea', 'sun'})", "tag_photos", "python_call",
         None, offered=[]),
    case("python/triple_quoted_argument", 'run_code(source="""print(1)\nprint(2)""")', "run_code",
         "python_call", {"source": "print(1)\nprint(2)"}, offered=[]),
]

GOAL_PROTOCOL = [
    case("goal/lower_case", 'goal: know the weather\nname: weather.get_weather\nargs: {"city": "Paris"}',
         "weather.get_weather", "goal_protocol", PARIS),
    case("goal/title_case", 'Goal: book\nName: book_table\nArgs: {"people": 2}', "book_table",
         "goal_protocol", {"people": 2}),
    case("goal/thought_api_params", 'thought: forecast\napi: get_weather\nparams: {"city": "Paris"}',
         "get_weather", "goal_protocol", PARIS),
    case("goal/without_goal_line", "name: book_table\nargs: {'people': 3}", "book_table", "goal_protocol",
         {"people": 3}),
    case("goal/text_args", "goal: weather\nname: get_weather\nargs: Paris, tomorrow", "get_weather",
         "goal_protocol", None),
    case("goal/multi_line_args", 'Name: book_table\nArgs: {\n  "people": 2\n}', "book_table", "goal_protocol",
         {"people": 2}),
]

NO_CALLS = [
    case("none/prose_mentions_tool", "I could use the weather tool, but it cannot book tables."),
    case("none/prose_names_tool", "get_weather is not suited to this: it only reports forecasts."),
    case("none/refusal_names_tool",
         "I'm sorry, but I can't reserve that: book_table needs a restaurant ID, and I don't have one."),
    case("none/empty_parens_mention", "`get_weather()` only covers forecasts, so I can't help with flights."),
    case("none/user_code_functions",
         "Here is the script:\n```python\ndef top_words(text):\n    words = sorted(text.split(), key=len)\n"
         "    print(len(words))\n    return words[:10]\n```"),
    case("none/user_code_pandas",
         "```python\nimport pandas as pd\ndf = pd.read_csv(path_in, sep=';')\n"
         "summary = df.groupby(by='city').agg(total=('sales', 'sum'))\nprint(summary)\n```"),
    case("none/user_code_dict_literal",
         '```python\nconfig = {"name": "app", "args": ["--verbose"]}\nrun_app(**config)\n```'),
    case("none/user_code_defines_offered_name",
         '```python\ndef get_weather(city):\n'
         '    return requests.get(API_URL, params={"q": city}).json()\n```'),
    case("none/json_data", 'The reading: {"temperature": 21, "unit": "C", "city": "Paris"}'),
    case("none/json_name_without_arguments",
         '```json\n[{"name": "Alice", "age": 30}, {"name": "Bo", "age": 4}]\n```'),
    case("none/tool_schema",
         '{"name": "get_weather", "description": "Forecast", "parameters": {"type": "object", '
         '"properties": {"city": {"type": "string"}}}}'),
    case("none/final_answer", "Thought: I know this.\nFinal Answer: Paris is sunny today."),
    case("none/action_finish",
         'Thought: done\nAction: Finish\n'
         'Action Input: {"return_type": "give_answer", "final_answer": "Sunny."}'),
    case("none/action_none", "Thought: no tool fits.\nAction: None\nAction Input: {}"),
    case("none/tool_calls_finish_only", "It is sunny.",
         tool_calls=native("Finish", '{"return_type": "give_answer"}')),
    case("none/empty", ""),
    case("none/whitespace", "  \n\t \n"),
    case("none/cut_off_prose", "The quickest way to get from Lisbon to Porto is to take the"),
    case("none/cut_off_json", 'Sure. {"name": "get_weather", "arguments": {"city": "Par'),
    case("none/cut_off_python", 'Let me check.\ntools.search_flights(query="Lisbon to'),
    case("none/cut_off_react", "Thought: I need the forecast.\nAction: get_weather\n"),
    case("none/builtins_in_prose", "Call len(items) or print(total) to see it."),
    case("none/positional_helper_in_prose", "Build the path with `os.path.join(base, name)` first."),
    case("none/apostrophes_and_braces", "It's {sunny} and {'mild' today, isn't it? get_x(it's"),
    case("none/claimed_action", "I've booked a table for two at 8pm."),
    case("none/name_line_without_args", "Name: Ana Lopez\nRole: engineer"),
]

CALLS = TOOL_CALLS + REACT + JSON_CALLS + PYTHON_CALLS + GOAL_PROTOCOL + NO_CALLS


@pytest.mark.parametrize(("reply", "name", "rule", "arguments", "tool_calls", "offered"), CALLS)
def test_verdict(reply, name, rule, arguments, tool_calls, offered):
    verdict = find_call(reply, offered, tool_calls)
    assert (verdict.called, verdict.name, verdict.rule) == (bool(rule), name, rule)
    if arguments is not SKIP:
        assert verdict.arguments == arguments
    if not rule:
        assert verdict == Verdict(False)


def test_table_covers_every_rule():
    assert {param.values[2] for param in CALLS} == {"tool_calls", "react", "json_call", "python_call",
                                                    "goal_protocol", ""}
    assert len(CALLS) >= 60 and len(NO_CALLS) >= 20


def test_matched_is_the_call_text_clipped():
    verdict = find_call('Sure.\nbook_table(people=2, note="x")\nDone.', OFFERED)
    assert verdict.matched == 'book_table(people=2, note="x")'
    long = find_call(json.dumps({"name": "book_table", "arguments": {"note": "x" * 1000}}))
    assert long.called and len(long.matched) == MAX_MATCHED


def test_react_keeps_the_first_real_action():
    reply = ('Action: get_weather\nAction Input: {"city": "Paris"}\nObservation: 21C\n'
             'Action: book_table\nAction Input: {"people": 2}')
    assert find_call(reply).name == "get_weather"


def test_rule_order_react_before_json():
    reply = 'Action: get_weather\nAction Input: {"name": "book_table", "arguments": {}}'
    assert find_call(reply).rule == "react"


def test_long_degenerate_replies_stay_linear():
    """Repetition loops of 100 KB full of unclosed brackets and apostrophes: under a second each when
    every bracket is scanned about once, minutes when each scans to the end."""
    for loop in ("f_x(g_y(", "It's {'a' day, isn't it? ", 'see foo_bar(it\'s) {"a": [1, '):
        started = time.perf_counter()
        assert not find_call((loop * 20_000)[:100_000], OFFERED).called
        assert time.perf_counter() - started < 30


@pytest.mark.parametrize("scenario", ["no_tools", "irrelevant_tools"])
def test_simulator_negatives(scenario):
    """The negatives simulator's call corruptions are calls, its plausible answers and claims are not."""
    tools = [{"name": "weather.get_weather", "description": "Forecasts"}, {"name": "book_table"}]
    request = {"scenario": scenario, "tools": tools if scenario == "irrelevant_tools" else [],
               "query": "Can you book me a flight to Lisbon tomorrow?"}
    offered = [tool["name"] for tool in request["tools"]]
    rules = {"react_call": "react", "json_call": "json_call", "python_call": "python_call",
             "goal_protocol": "goal_protocol", "tool_calls": "json_call", "claimed_action": "", "empty": ""}
    for seed in range(40):
        answer = sim_negative.plausible_answer(request, str(seed))
        assert not find_call(answer, offered).called, answer
        for kind, rule in rules.items():
            reply = sim_negative.ANSWER_CORRUPTERS[kind](request, answer, random.Random(seed))
            assert find_call(reply, offered).rule == rule, reply


# --- same_call ---------------------------------------------------------------------------------------

def judged(reply, offered=OFFERED):
    return find_call(reply, offered)


@pytest.mark.parametrize(("written", "expected"), [
    ("weather.get_weather", "weather.get_weather"),
    ("get_weather", "weather.get_weather"),
    ("weather.get_weather", "get_weather"),
    ("tools.book_table", "book_table"),
])
def test_same_call_name_in_qualified_or_bare_form(written, expected):
    verdict = judged(f'{written}(city="Paris")')
    assert same_call(verdict, {"name": expected, "arguments": PARIS}, OFFERED) == (True, True)


def test_same_call_other_qualifier_is_wrong():
    verdict = judged('news.get_weather(city="Paris")')
    assert same_call(verdict, {"name": "weather.get_weather", "arguments": PARIS}) == (False, True)


def test_same_call_bare_name_shared_by_two_offered_tools_is_wrong():
    offered = ["weather.get_weather", "climate.get_weather"]
    verdict = judged('get_weather(city="Paris")', offered)
    assert same_call(verdict, {"name": "weather.get_weather", "arguments": PARIS}, offered) == (False, True)
    exact = judged('weather.get_weather(city="Paris")', offered)
    assert same_call(exact, {"name": "weather.get_weather", "arguments": PARIS}, offered) == (True, True)


@pytest.mark.parametrize(("written", "expected"), [
    ('{"people": "3"}', {"people": 3}),
    ('{"people": 3.0}', {"people": "3"}),
    ('{"b": 2, "a": {"y": [1, "2"], "x": "z"}}', {"a": {"x": "z", "y": ["1", 2]}, "b": 2}),
    ('{"ok": true, "note": null}', {"note": None, "ok": True}),
    ('{"q": "Paris"}', '{"q": "Paris"}'),
])
def test_same_call_arguments_as_values(written, expected):
    verdict = judged(f"Action: book_table\nAction Input: {written}")
    assert same_call(verdict, {"name": "book_table", "arguments": expected}) == (True, True)


@pytest.mark.parametrize(("written", "expected"), [
    ('{"people": 3}', {"people": 4}),
    ('{"people": 3}', {"people": 3, "time": "19:00"}),
    ('{"people": 3, "time": "19:00"}', {"people": 3}),
    ('{"ok": true}', {"ok": 1}),
    ('{"q": "Paris "}', {"q": "Paris"}),
    ('{"q": "three"}', {"q": 3}),
    ("Paris", {"q": "Paris"}),
])
def test_same_call_wrong_arguments(written, expected):
    verdict = judged(f"Action: book_table\nAction Input: {written}")
    assert same_call(verdict, {"name": "book_table", "arguments": expected}) == (True, False)


def test_same_call_without_a_call():
    assert same_call(find_call("It is sunny."), {"name": "get_weather", "arguments": {}}) == (False, False)


JSON_ASKED = '{\n    "reason": "Paris first.",\n    "action": "weather.get_weather",\n    "action_input": {"city": "Paris"}\n}'
GOAL_ASKED = 'goal: Paris first.\nname: weather.get_weather\nargs: {"city": "Paris"}'


@pytest.mark.parametrize("fmt, reply, hit", [
    ("json", JSON_ASKED, True),
    ("json", f"```json\n{JSON_ASKED}\n```", True),
    ("json", GOAL_ASKED, False),  # a call, in the other protocol
    ("json", 'Action: weather.get_weather\nAction Input: {"city": "Paris"}', False),
    ("json", '{"reason": "Paris first.", "action": "weather.get_weather", "action_input": {"city": ', False),  # cut off
    ("goal", GOAL_ASKED, True),
    ("goal", "Goal: Paris first.\nName: weather.get_weather\nArgs: {\"city\": \"Paris\"}", True),
    ("goal", JSON_ASKED, False),
    ("goal", "I would call weather.get_weather for Paris.", False),
    ("json", "", False),
])
def test_format_call_reads_only_the_asked_protocol(fmt, reply, hit):
    verdict = format_call(reply, fmt)
    assert verdict.called is hit
    if hit:
        assert verdict.rule == FORMAT_RULES[fmt]
        assert same_call(verdict, {"name": "weather.get_weather", "arguments": PARIS}, OFFERED) == (True, True)


def test_the_report_has_a_format_hit_rate_where_a_format_is_asked():
    def row(suite, protocol, format_hit, right):
        return {"suite": suite, "protocol": protocol, "expect_call": True, "called": True, "name_right": right,
                "arguments_right": right, "correct": right, "format_hit": format_hit}

    rows = [row("instruct", "json", True, True), row("instruct", "json", True, False),
            row("instruct", "json", False, False), row("instruct", "json", False, False),
            row("tool_call", "general", None, True)]
    groups = score(rows)["groups"]
    assert groups["instruct/json"]["format_hit"] == 50.0 and groups["instruct/json"]["name_accuracy"] == 25.0
    assert groups["tool_call/general"]["format_hit"] is None
    md = markdown({"model": {"name": "m", "backend": "endpoint"}, "generation": {}, "sets": [],
                   "scores": score(rows)})
    assert "| call rate % | format hit % | name % |" in md
    assert "| instruct/json | 4 | 25.0 |  | 100.0 | 50.0 | 25.0 | 25.0 |" in md
