"""The simulator's answers to requests with ``tools=``: native ``tool_calls``, scripted or plausible.

    echoed <<<TOOL_CALL>>>{"name": .., "arguments": {..}}   that call, as a native tool call; without
                                                          tools= (or when it is not such an object)
                                                          the text after the marker, as a model
                                                          without native tools would write the call
    a conversation ending with a user turn                about half of them (by the prompt's hash)
                                                          call one offered tool with its required
                                                          parameters (``example_value``, else a value
                                                          of their type)
    anything else                                         None: the simulator's ordinary reply
"""

from __future__ import annotations

import json

TOOL_CALL = "<<<TOOL_CALL>>>"


def tool_reply(messages: list[dict], tools: list[dict], echoed: str | None, digest: str) -> tuple[str, list[dict]] | None:
    """``(content, tool_calls)``, or None for the ordinary reply."""
    if echoed is not None and echoed.startswith(TOOL_CALL):
        body = echoed[len(TOOL_CALL):]
        scripted = scripted_call(body)
        if scripted is None or not tools:
            return body, []
        return "", [native_call(*scripted, digest)]
    if echoed is None and tools and messages and messages[-1].get("role") == "user" and int(digest[8:10], 16) % 2 == 0:
        tool = tools[int(digest[:8], 16) % len(tools)]["function"]
        return "", [native_call(tool["name"], json.dumps(example_arguments(tool), ensure_ascii=False), digest)]
    return None


def scripted_call(text: str) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of a scripted ``{"name", "arguments"}``; arguments given as a
    string are kept as they are (a test may script broken ones); None when not such an object."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def native_call(name: str, arguments: str, digest: str) -> dict:
    return {"id": f"call_{digest[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def example_arguments(function: dict) -> dict:
    """The required parameters of a tool schema: their ``example_value``, else a value of their type."""
    parameters = function.get("parameters") if isinstance(function.get("parameters"), dict) else {}
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    by_type = {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    arguments = {}
    for name in parameters.get("required") or []:
        schema = properties.get(name) if isinstance(properties.get(name), dict) else {}
        arguments[name] = schema.get("example_value", by_type.get(schema.get("type"), "example"))
    return arguments
