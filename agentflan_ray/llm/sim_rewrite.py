"""Simulated replies to the LLM rewrite prompt: plausible prose, and the ways real models get it wrong.

A rewrite request (a system prompt that starts with ``prompts.MARKER``, see ``aligning/prompts.py``)
is always answered from its original user message, ``messages[1]``, also when the client re-asks
after a rejected reply (then the list has four messages)::

    messages[1] --json--> {"task", "steps": [{"n", "tool", ..}], "pieces": [[kind, step n, draft], ..]}
    plausible(request)    one rewrite per piece from its draft and kind: deterministic candidates,
                          best first; the first that passes prompts.piece_problem against its draft
                          alone (the strictest facts, so it passes against any richer facts) is kept
    rewrite_reply(messages, digest, rate)
                          int(digest[:8], 16) / 16**8 < rate   -> corrupt(request, pieces, kind),
                          kind = CORRUPTIONS[int(digest[8:16], 16) % 8]; else {"pieces": [...]}

The digest is the simulator's sha256 of the whole message list, so every request, re-asks included,
draws on its own. Each corruption is a way real models go wrong, and the validators catch it::

    changed_number   a number that occurs nowhere in the request     unsupported_number / missing_fact
    invented_call    a fenced dict call or Action:/Action Input:     call_syntax
    foreign_tool     another tool of the request (or an invented)    foreign_tool
    missing_item     one piece dropped                               wrong_piece_count
    extra_item       one piece repeated                              wrong_piece_count
    broken_json      the reply cut in the middle                     not_json
    cut_off          cut short, finish_reason "length"               length (and not_json)
    empty_piece      one piece ""                                    empty

A user message that is not a JSON object gets ``{"pieces": []}``; missing context keys count as empty.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from agentflan_ray.aligning import prompts

PROTOCOL_LINE = re.compile(r"(?i)^\s*(?:action input|action|observation)\s*:")
PREFIX = re.compile(r"(?i)^\s*(?:thought|final answer|answer)\s*:\s*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

OPENERS = ("Let me think about this.", "Okay, here is my plan.", "Right.", "Good, on to the next step.", "")
LEADS = ("Here is what I found:", "Here is the answer.", "All done.", "To sum up:")
NAMED = {  # generic prose that names the piece's own tool
    "thought": ("I'll use {tool} for this step.", "{tool} should give me what I need next.",
                "The next thing to do is to ask {tool}."),
    "connective": ("Now I'll make the call to {tool}.", "I'll run {tool} with these arguments.",
                   "Calling {tool} now.", "Let me query {tool}."),
}
NAMED["env_thought"] = NAMED["thought"]
PLAIN = {  # generic prose that names nothing
    "thought": ("I need one more piece of information before I can answer.", "Let me take the next step.",
                "I'll work on the next part of the task."),
    "env_thought": ("I'll take the next action.", "Let me try the next move.", "Time for the next action."),
    "connective": ("I'll make the call now.", "Let me run it.", "Here is the call."),
    "final": ("I have finished the task.", "That completes the task.", "The task is done."),
    "elicit_tool": ("Which tool will you use for this step?", "What are you going to call next?",
                    "Which function fits this step?", "What tool do you need here?"),
    "elicit_arguments": ("What arguments does the call need?", "Which parameters will you pass?",
                         "What should the call's inputs be?", "What values will you send with it?"),
}
WITHOUT_DRAFT = ("connective", "elicit_tool", "elicit_arguments")  # written from a bank alone
EMPTY_REPLY = json.dumps({"pieces": []})


def is_rewrite(messages: list[dict]) -> bool:
    first = messages[0] if messages else {}
    return first.get("role") == "system" and str(first.get("content") or "").startswith(prompts.MARKER)


def parse_request(messages: list[dict]) -> dict | None:
    """The original request (``messages[1]``) as a dict, or None when it is not a JSON object."""
    try:
        request = json.loads(messages[1]["content"])
    except (IndexError, KeyError, TypeError, ValueError, RecursionError):
        return None
    return request if isinstance(request, dict) else None


def _list(request: dict, key: str) -> list:
    value = request.get(key)
    return value if isinstance(value, list) else []


def _string(item: dict, key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""


def asked(request: dict) -> list[prompts.Piece]:
    """The pieces asked for, each with its step's tool."""
    tools = {step.get("n"): _string(step, "tool") for step in _list(request, "steps") if isinstance(step, dict)}
    pieces = []
    for i, item in enumerate(_list(request, "pieces")):
        kind, step, draft = (item + [None] * 3)[:3] if isinstance(item, list) else (None, None, None)
        kind, draft = (v if isinstance(v, str) else "" for v in (kind, draft))
        pieces.append(prompts.Piece(f"n{i + 1}", kind, draft, tools.get(step, "") if kind != "final" else ""))
    return pieces


def tool_names(request: dict) -> list[str]:
    """The tools of the request's steps, qualified and bare."""
    qualified = sorted({_string(s, "tool") for s in _list(request, "steps") if isinstance(s, dict)} - {""})
    return qualified + [name.rsplit(".", 1)[-1] for name in qualified if "." in name]


def _choose(bank: tuple[str, ...], key: str) -> str:
    return bank[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(bank)]


def clean(draft: str, keep=lambda sentence: True) -> str:
    """The draft without Action:-style lines, Thought:-style prefixes, sentences of DFSDT talk and
    sentences ``keep`` rejects."""
    lines = [line for line in draft.splitlines() if not PROTOCOL_LINE.match(line)]
    sentences = (PREFIX.sub("", s) for s in SENTENCE_END.split(" ".join(" ".join(lines).split())))
    return " ".join(s for s in sentences if s and not prompts.DFSDT.search(s) and keep(s))


def candidates(piece: prompts.Piece, names: list[str] = ()) -> list[str]:
    """Rewrites of one piece, best first; the last names nothing and holds no number. Sentences of
    the draft that break a rule on their own (another step's tool, a call) are left out, as a
    careful writer would."""
    key = piece.kind + piece.template

    own = {piece.tool, piece.tool.rsplit(".", 1)[-1]}

    def keep(sentence: str) -> bool:
        if any(name not in own for name in prompts.TOOLBENCH_NAME.findall(sentence)):
            return False  # a tool of the catalogue the writer was not shown
        problem = prompts.piece_problem(sentence, piece, piece.template, list(names))
        return not problem or prompts.reason_of(problem) == "missing_fact"

    texts = []
    if piece.kind not in WITHOUT_DRAFT and (cleaned := clean(piece.template, keep)):
        opener = _choose(LEADS if piece.kind == "final" else OPENERS, key)
        texts.append(f"{opener} {cleaned}".strip())
    if piece.tool and piece.kind in NAMED:
        texts.append(_choose(NAMED[piece.kind], key).format(tool=piece.tool))
    texts.append(_choose(PLAIN.get(piece.kind, PLAIN["thought"]), key))
    return texts


def plausible(request: dict) -> list[str]:
    """One deterministic rewrite per piece that the project's checks accept (where any can)."""
    names = tool_names(request)

    def rewrite(piece: prompts.Piece) -> str:
        texts = candidates(piece, names)
        return next((t for t in texts if not prompts.piece_problem(t, piece, piece.template, names)), texts[-1])

    return [rewrite(piece) for piece in asked(request)]


def _dump(texts: list[str]) -> str:
    return json.dumps({"pieces": texts}, ensure_ascii=False)


def _request_text(request: dict) -> str:
    return json.dumps(request, ensure_ascii=False, sort_keys=True)


def _index(request: dict, rng: random.Random, kinds: tuple[str, ...]) -> int:
    """A piece of one of ``kinds`` if the request has one, else any piece."""
    pieces = asked(request)
    fitting = [i for i, p in enumerate(pieces) if p.kind in kinds]
    return rng.choice(fitting or range(len(pieces)))


def _append(texts: list[str], index: int, addition: str) -> str:
    texts = list(texts)
    texts[index] = f"{texts[index]}{addition}"
    return _dump(texts)


def changed_number(request: dict, texts: list[str], rng: random.Random) -> str:
    fresh, request_text = rng.randrange(100, 1000), _request_text(request)
    while str(fresh) in request_text:
        fresh += 1
    start = rng.randrange(len(texts))
    for index in [*range(start, len(texts)), *range(start)]:
        if match := prompts.NUMBER.search(texts[index]):
            texts = list(texts)
            texts[index] = texts[index][: match.start()] + str(fresh) + texts[index][match.end():]
            return _dump(texts)
    return _append(texts, _index(request, rng, ("thought", "final", "env_thought")),
                   f" That comes to {fresh} in total.")


def invented_call(request: dict, texts: list[str], rng: random.Random) -> str:
    index = _index(request, rng, ("thought", "env_thought"))
    tool = asked(request)[index].tool or "search"
    arguments = {"query": " ".join(_string(request, "task").split()[:6])}
    if rng.random() < 0.5:
        call = "\n```python\n" + repr({"name": tool, "parameters": arguments}) + "\n```"
    else:
        call = f"\nAction: {tool}\nAction Input: {json.dumps(arguments, ensure_ascii=False)}"
    return _append(texts, index, call)


def foreign_tool(request: dict, texts: list[str], rng: random.Random) -> str:
    index = _index(request, rng, ("thought", "connective", "env_thought"))
    own = asked(request)[index].tool
    others = [n for n in tool_names(request) if n not in {own, own.rsplit(".", 1)[-1]}]
    name, request_text = "lookup_for_somethingapi", _request_text(request)
    while name in request_text:
        name = "x" + name
    return _append(texts, index, f" I could also check {rng.choice(others) if others else name} for this.")


def missing_item(request: dict, texts: list[str], rng: random.Random) -> str:
    index = rng.randrange(len(texts))
    return _dump(texts[:index] + texts[index + 1:])


def extra_item(request: dict, texts: list[str], rng: random.Random) -> str:
    index = rng.randrange(len(texts))
    return _dump(texts[: index + 1] + texts[index:])


def broken_json(request: dict, texts: list[str], rng: random.Random) -> str:
    content = _dump(texts)
    return content[: len(content) // 2]


def cut_off(request: dict, texts: list[str], rng: random.Random) -> str:
    """Cut where the token limit struck; sent with finish_reason "length"."""
    content = _dump(texts)
    return content[: rng.randrange(1, len(content))]


def empty_piece(request: dict, texts: list[str], rng: random.Random) -> str:
    index = rng.randrange(len(texts))
    return _dump(texts[:index] + [""] + texts[index + 1:])


CORRUPTERS = {f.__name__: f for f in (changed_number, invented_call, foreign_tool, missing_item, extra_item,
                                      broken_json, cut_off, empty_piece)}
CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTERS)


def corrupt(request: dict, pieces: list[str], kind: str) -> tuple[str, str]:
    """``(content, finish_reason)``: the correct reply ``pieces`` (at least one) gone wrong the ``kind`` way."""
    content = CORRUPTERS[kind](request, pieces, random.Random(f"{kind}\n{_request_text(request)}"))
    return content, "length" if kind == "cut_off" else "stop"


def rewrite_reply(messages: list[dict], digest: str, rate: float) -> tuple[str, str, str]:
    """``(content, finish_reason, corruption kind or "")`` for a rewrite request."""
    request = parse_request(messages)
    if request is None:
        return EMPTY_REPLY, "stop", ""
    pieces = plausible(request)
    if pieces and int(digest[:8], 16) < rate * 16**8:
        kind = CORRUPTIONS[int(digest[8:16], 16) % len(CORRUPTIONS)]
        return (*corrupt(request, pieces, kind), kind)
    return _dump(pieces), "stop", ""
