"""The evaluation judge: did a model reply call a tool, which one, with what arguments. Code, not an LLM.

``find_call`` tries the rules below in order; the first that finds a call gives the ``Verdict``::

    rule           fires on                                              arguments from
    tool_calls     the OpenAI ``tool_calls`` list passed beside the      function.arguments (JSON text
                   reply, when non-empty                                 or an object)
    react          an ``Action:``/``Tool:`` line, then an                the input, as JSON or a Python
                   ``Action Input:``/``Tool Input:`` line (any case)     literal (None when plain text)
    json_call      an object with a name key (name, action, tool,        its arguments key (arguments,
                   api_name, function, command) and an arguments key     parameters, args, action_input,
                   (keys compared lower-case, without ``_`` or spaces),  input, param, params); a JSON
                   at any depth of a balanced ``{...}`` outside fences   string is parsed
                   or of a fenced block that is wholly data
    python_call    ``name(...)``, closed, where name is an offered       keyword arguments, as literals
                   tool (``a.b``, ``b``, or ``x.b`` for an offered       (``{}`` for none; None when
                   ``b``) anywhere; or, outside fences, a tool-like      positional or not literal)
                   name (with ``_`` or ``.``) called with keywords
    goal_protocol  a ``name:``/``api:`` line, then an ``args:``/         the args line(s), as for react
                   ``params:`` line (any case; ``goal:`` optional)

Never a call: ``Finish``/``Final Answer``/``None`` (ways to answer, in every rule); a tool schema
(arguments ``{"type": "object", "properties": ..}``); code in a fenced block unless it calls an offered
tool; an offered name with empty parentheses inside a sentence (a mention; alone on its line it is a
call); a JSON or Python call cut off before its closing bracket; JSON data without a name and arguments
pair; empty replies.

``format_call`` reads a reply by the one rule of a protocol an `instruct` case asks for (``FORMAT_RULES``:
json -> json_call, goal -> goal_protocol): T-Eval's format hit is a call found that way.

``same_call`` compares a verdict with the expected ``{"name", "arguments"}``: the name is right when
equal, or when one is the bare form of the other (``weather.get_x`` and ``get_x``) unless two offered
tools share that bare name; the arguments are right when equal as values (key order aside, numbers as
numbers: ``"3"`` equals ``3``, booleans stay booleans).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

MAX_MATCHED = 300
NO_TOOL_NAMES = {"finish", "final answer", "final_answer", "none", "n/a"}  # ways to answer or not to act
NAME_KEYS = ("name", "action", "tool", "apiname", "function", "command")
ARGUMENT_KEYS = ("arguments", "parameters", "args", "actioninput", "input", "param", "params")
CLOSERS = {"{": "}", "(": ")"}
DECODER = json.JSONDecoder()
# What the bracket scan stops at: quotes (triple first), escapes, brackets, line ends.
SYNTAX = re.compile(r"\"\"\"|\'\'\'|\\.|[\"'{}()\n]", re.S)
DICT_START = re.compile(r"\{\s*[\"']")

# A fenced block; one cut off before its closing fence runs to the end of the reply.
FENCE = re.compile(r"```(?:[\w+.-]*[ \t]*\n)?(?P<body>.*?)(?:```|\Z)", re.S)
# Optional markdown (quote, bold) around the keys of the line protocols.
_KEY_START, _KEY_END = r"^[ \t>*]*", r"[ \t*]*:[ \t*]*"
REACT = re.compile(
    rf"{_KEY_START}(?:action|tool){_KEY_END}(?P<name>[^\n]*?)[ \t*]*\n(?:[ \t]*\n)*"
    rf"{_KEY_START}(?:action|tool)[ \t_]*input{_KEY_END}(?P<input>.*?)"
    rf"(?=\n[ \t>*]*(?:observation|thought|action|tool|final answer)[ \t*]*:|\Z)",
    re.I | re.M | re.S)
GOAL = re.compile(
    rf"{_KEY_START}(?:name|api){_KEY_END}(?P<name>[^\n]*?)[ \t*]*\n(?:[ \t]*\n)*"
    rf"{_KEY_START}(?:args|params){_KEY_END}(?P<input>.*?)"
    rf"(?=\n[ \t>*]*(?:goal|thought|name|api)[ \t*]*:|\Z)",
    re.I | re.M | re.S)
CALL_HEAD = re.compile(r"(?<![\w.])(?<!def )(?<!class )(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
FORMAT_RULES = {"json": "json_call", "goal": "goal_protocol"}  # an instruct case's format -> its rule


@dataclass(frozen=True)
class Verdict:
    called: bool
    name: str = ""  # the called tool's name as written ("" when none)
    arguments: dict | None = None  # parsed arguments (None when none or unparseable)
    rule: str = ""  # tool_calls | react | json_call | python_call | goal_protocol | "" (none)
    matched: str = ""  # the matched text (at most MAX_MATCHED characters)


NO_CALL = Verdict(False)


def find_call(reply: str, offered: list[str] = (), tool_calls: list[dict] | None = None) -> Verdict:
    """The first call found in ``reply`` (or in ``tool_calls``), by the rules of the module docstring."""
    text = reply or ""
    verdict = (_native_call(tool_calls or []) or _react_call(text) or _json_call(text)
               or _python_call(text, offered) or _goal_call(text))
    return verdict or NO_CALL


def format_call(reply: str, fmt: str) -> Verdict:
    """The call ``reply`` makes in the protocol ``fmt`` (a key of ``FORMAT_RULES``), by that rule alone."""
    rule = {"json": _json_call, "goal": _goal_call}[fmt]
    return rule(reply or "") or NO_CALL


def same_call(verdict: Verdict, expect: dict, offered: list[str] = ()) -> tuple[bool, bool]:
    """``(name right, arguments right)`` of a verdict against ``{"name", "arguments"}``."""
    if not verdict.called:
        return False, False
    expected = _arguments(expect.get("arguments", {}))
    name_right = _same_name(verdict.name, str(expect.get("name", "")), offered)
    arguments_right = None not in (verdict.arguments, expected) and _same_value(verdict.arguments, expected)
    return name_right, arguments_right


# --- the rules ---------------------------------------------------------------------------------------

def _native_call(tool_calls: list[dict]) -> Verdict | None:
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if _is_name(name):
            matched = json.dumps(call, ensure_ascii=False, default=str)
            return _verdict(name, _arguments(function.get("arguments")), "tool_calls", matched)
    return None


def _react_call(text: str) -> Verdict | None:
    return _line_call(REACT, text, "react")


def _goal_call(text: str) -> Verdict | None:
    return _line_call(GOAL, text, "goal_protocol")


def _line_call(pattern: re.Pattern, text: str, rule: str) -> Verdict | None:
    """A name line followed by an input line; the input may run over several lines."""
    for match in pattern.finditer(text):
        name = match.group("name").strip("`'\" ")
        if _is_name(name):
            return _verdict(name, _arguments(match.group("input")), rule, match.group(0))
    return None


def _json_call(text: str) -> Verdict | None:
    for source, value in _data(text):
        if found := _call_in(value):
            return _verdict(*found, "json_call", source)
    return None


def _python_call(text: str, offered: list[str]) -> Verdict | None:
    fences, brackets = [fence.span("body") for fence in FENCE.finditer(text)], Brackets(text)
    for head in CALL_HEAD.finditer(text):
        name, end = head.group("name"), brackets.close(head.end() - 1)
        if end is None or _is_no_tool(name):
            continue
        source, call = text[head.start():end], _parse_call(text[head.start():end])
        in_fence = any(start <= head.start() < stop for start, stop in fences)
        tool_like = "_" in name or "." in name
        if _is_offered(name, offered):
            counts = in_fence or _has_arguments(source) or _alone_on_line(text, head.start(), end)
        else:
            counts = tool_like and not in_fence and call is not None and bool(call.keywords)
        if counts:
            return _verdict(name, _keyword_arguments(call), "python_call", source)
    return None


# --- JSON and Python literals ------------------------------------------------------------------------

def _data(text: str) -> list[tuple[str, object]]:
    """``(source, value)`` of the data in ``text``, in order: fenced blocks that parse wholly as JSON or
    a Python literal, and balanced ``{...}`` outside fences that parse."""
    bodies = [(fence.start(), fence.group("body")) for fence in FENCE.finditer(text)]
    found = [(start, body, value) for start, body in bodies if (value := _literal(body)) is not None]
    outside = FENCE.sub(lambda fence: " " * len(fence.group()), text)
    start, brackets = outside.find("{"), Brackets(outside)
    while start != -1:
        end, value = _object_at(brackets, start)
        if value is not None:
            found.append((start, outside[start:end], value))
        start = outside.find("{", end if value is not None else start + 1)
    return [(source, value) for _, source, value in sorted(found, key=lambda item: item[0])]


def _object_at(brackets: Brackets, start: int) -> tuple[int, object]:
    """``(end, value)`` of the JSON object, else of the Python dict, at ``text[start]``; value None when
    neither. Only a dict-like start (a quoted key) is matched bracket by bracket, so prose full of braces
    stays linear."""
    try:
        value, end = DECODER.raw_decode(brackets.text, start)
        return end, value
    except ValueError:
        pass
    end = brackets.close(start) if DICT_START.match(brackets.text, start) else None
    return (end, _literal(brackets.text[start:end])) if end else (start, None)


def _call_in(value) -> tuple[str, dict | None] | None:
    """``(name, arguments)`` of the first object holding a call, the outer object before its values."""
    if isinstance(value, dict):
        if found := _object_call(value):
            return found
        children = list(value.values())
    elif isinstance(value, list):
        children = value
    else:
        return None
    return next((found for child in children if (found := _call_in(child))), None)


def _object_call(value: dict) -> tuple[str, dict | None] | None:
    keys = {re.sub(r"[\W_]", "", key.lower()): key for key in value if isinstance(key, str)}
    name_key = next((keys[k] for k in NAME_KEYS if k in keys), None)
    arguments_key = next((keys[k] for k in ARGUMENT_KEYS if k in keys), None)
    if name_key is None or arguments_key is None or not _is_name(value[name_key]):
        return None
    arguments = value[arguments_key]
    if isinstance(arguments, dict) and arguments.get("type") == "object" and "properties" in arguments:
        return None  # a tool's schema, not a call
    return value[name_key].strip(), _arguments(arguments)


def _arguments(value) -> dict | None:
    """Arguments as a dict: a dict as is, text parsed as JSON or a Python literal (a leading object
    taken alone, a fence removed); None for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("```"):
            text = FENCE.match(text).group("body").strip()
        value = _object_at(Brackets(text), 0)[1] if text.startswith("{") else _literal(text)
    return value if isinstance(value, dict) else None


def _literal(text: str):
    """``text`` parsed as JSON, else as a Python literal; None when neither."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
    return None


class Brackets:
    """Where the brackets of a text close. A scan from one bracket records every bracket of its kind
    that it passes outside strings (their own scans would see the same), so long replies stay linear."""

    def __init__(self, text: str):
        self.text, self.closing = text, {}

    def close(self, start: int) -> int | None:
        """The index just past the bracket closing ``text[start]``; None when it never closes (cut
        off) or a one-line string meets a line end first (prose, where an apostrophe is no quote)."""
        if start not in self.closing:
            self._scan(start)
        return self.closing[start]

    def _scan(self, start: int) -> None:
        opener, closer = self.text[start], CLOSERS[self.text[start]]
        opened, quote = [], ""
        for token in SYNTAX.finditer(self.text, start):
            mark = token.group()
            if quote:
                if mark == "\n" and len(quote) == 1:
                    break
                if mark == quote or (len(quote) == 1 and mark[0] == quote):  # '"""' there: '"' then '""'
                    quote = ""
            elif mark[0] in "\"'":
                quote = mark
            elif mark == opener:
                opened.append(token.start())
            elif mark == closer:
                self.closing[opened.pop()] = token.end()
                if not opened:
                    return
        self.closing.update(dict.fromkeys(opened))


def _parse_call(source: str) -> ast.Call | None:
    try:
        node = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return node if isinstance(node, ast.Call) else None


def _keyword_arguments(call: ast.Call | None) -> dict | None:
    """Keyword arguments as literals; None when a positional, ``**`` or non-literal argument is there."""
    if call is None or call.args or any(keyword.arg is None for keyword in call.keywords):
        return None
    try:
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


# --- names and values --------------------------------------------------------------------------------

def _is_name(name) -> bool:
    return isinstance(name, str) and bool(name.strip()) and not _is_no_tool(name)


def _is_no_tool(name: str) -> bool:
    return name.strip().lower() in NO_TOOL_NAMES


def _bare(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _is_offered(name: str, offered: list[str]) -> bool:
    """``a.b`` or ``b`` for an offered ``a.b``; ``b`` or ``x.b`` for an offered ``b``."""
    return any(name in (tool, _bare(tool)) or _bare(name) == tool for tool in offered)


def _has_arguments(source: str) -> bool:
    return bool(source[source.index("(") + 1:-1].strip())


def _alone_on_line(text: str, start: int, end: int) -> bool:
    line_start = text.rfind("\n", 0, start) + 1
    line_end = len(text) if (found := text.find("\n", end)) == -1 else found
    return not (text[line_start:start] + text[end:line_end]).strip(" \t`")


def _same_name(written: str, expected: str, offered: list[str]) -> bool:
    """Equal, or one the bare form of the other while no two offered tools share that bare name."""
    if written == expected:
        return True
    shared = sum(_bare(tool) == _bare(expected) for tool in offered) > 1
    return not shared and (written == _bare(expected) or _bare(written) == expected)


def _same_value(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        return a.keys() == b.keys() and all(_same_value(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same_value, a, b))
    return _scalar(a) == _scalar(b)


def _scalar(value) -> tuple[str, object]:
    """A comparable form: numbers and numeric strings as floats, booleans apart from numbers."""
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, (int, float)):
        return "number", float(value)
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return "number", float(value)
    return type(value).__name__, value


def _verdict(name: str, arguments: dict | None, rule: str, matched: str) -> Verdict:
    """A call; arguments that JSON cannot hold (a Python set, bytes) count as unparseable."""
    arguments = arguments if _is_json(arguments) else None
    return Verdict(True, name, arguments, rule, matched.strip()[:MAX_MATCHED])


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True
