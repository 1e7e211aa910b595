"""Samples -> token ids and labels, with loss only on trained assistant turns.

Three templates:

* ``agentflan`` (the Agent-FLAN README): system and user turns are ``<|Human|>\\u0d46{text}\\n ``,
  assistant turns ``<|Assistant|>\\u0d46{text}\\u0d3f\\n ``;
* ``llama2``: ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>``;
* ``chat_template`` (the default): the tokenizer's own ``chat_template``, split into turns by
  rendering growing prefixes of the conversation.

Labels cover the assistant's text *and its end marker* (so generation learns to stop), never the
role header, and only for turns whose ``loss`` is true. Everything else is -100.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100
AGENTFLAN_USER = ("<|Human|>\u0d46", "\n ")
AGENTFLAN_ASSISTANT = ("<|Assistant|>\u0d46", "\u0d3f\n ")
AGENTFLAN_END = "\u0d3f"
TEMPLATES = ("chat_template", "agentflan", "llama2")


@dataclass
class Segment:
    text: str
    trained: bool


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    capability_tokens: dict[str, int]
    truncated: bool = False  # cut to max_seq_len (overlong: truncate); counted in the data report


class SkipSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def segments(messages: list[dict], template: str, tokenizer=None) -> list[Segment]:
    if template == "agentflan":
        return _agentflan(messages)
    if template == "llama2":
        return _llama2(messages, tokenizer)
    if template == "chat_template":
        return _chat_template(messages, tokenizer)
    raise ValueError(f"unknown template {template!r}; use one of {TEMPLATES}")


def _agentflan(messages: list[dict]) -> list[Segment]:
    out = []
    for m in messages:
        if m["role"] == "assistant":
            begin, end = AGENTFLAN_ASSISTANT
            out += [Segment(begin, False), Segment(m["content"] + end, bool(m["loss"]))]
        else:
            begin, end = AGENTFLAN_USER
            out.append(Segment(begin + m["content"] + end, False))
    return out


def _llama2(messages: list[dict], tokenizer) -> list[Segment]:
    eos = getattr(tokenizer, "eos_token", None) or "</s>"
    out, system, first = [], "", True
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            text = m["content"]
            if first and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            out.append(Segment(f"[INST] {text} [/INST]", False))
            first = False
        else:
            out.append(Segment(f" {m['content']} {eos}", bool(m["loss"])))
    return out


def _chat_template(messages: list[dict], tokenizer) -> list[Segment]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template chat_template needs a tokenizer that has a chat_template")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    out, previous = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            header = tokenizer.apply_chat_template(plain[:i], tokenize=False, add_generation_prompt=True)
            if header.startswith(previous) and len(header) > len(previous):
                out.append(Segment(header[len(previous):], False))
                previous = header
        text = tokenizer.apply_chat_template(plain[: i + 1], tokenize=False)
        if not text.startswith(previous):
            raise ValueError("the chat_template does not render conversations as growing prefixes")
        out.append(Segment(text[len(previous):], m["role"] == "assistant" and bool(m["loss"])))
        previous = text
    return out


def tokenize_sample(messages: list[dict], tokenizer, template: str, max_len: int, overlong: str = "truncate") -> Tokenized:
    """Token ids and labels of one sample. Raises ``SkipSample`` for samples with nothing to train
    on, or over-long samples when ``overlong == "drop"``."""
    if not any(m["role"] == "assistant" and m["loss"] for m in messages):
        raise SkipSample("no_trained_assistant_turn")
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "bos_token_id", None) is not None and template != "chat_template":
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    capability_tokens: dict[str, int] = {}
    assistant = iter([m for m in messages if m["role"] == "assistant"])
    for segment in segments(messages, template, tokenizer):
        piece = tokenizer.encode(segment.text, add_special_tokens=False)
        ids += piece
        labels += piece if segment.trained else [IGNORE] * len(piece)
        if segment.trained:
            message = next((m for m in assistant if m["loss"]), None)
            name = (message or {}).get("capability") or "unlabelled"
            capability_tokens[name] = capability_tokens.get(name, 0) + len(piece)
    if len(ids) > max_len:
        if overlong == "drop":
            raise SkipSample("longer_than_max_seq_len")
        ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels):
            raise SkipSample("no_trained_token_within_max_seq_len")
        return Tokenized(ids, labels, capability_tokens, truncated=True)
    return Tokenized(ids, labels, capability_tokens)
