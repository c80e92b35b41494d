"""Input lines: one JSON request per line, checked here so that a bad line costs that line only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")


class RequestError(ValueError):
    pass


@dataclass
class Request:
    index: int  # 1-based line number in the input file
    id: Any
    messages: list[dict]
    reasoning_effort: str | None = None
    tools: list[dict] = field(default_factory=list)
    max_new_tokens: int | None = None


def parse_line(text: str, index: int) -> Request:
    """Parse one input line, raising RequestError with a message that says what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"not valid JSON: {e}") from None
    return parse_request(obj, index)


def parse_request(obj: Any, index: int) -> Request:
    """A decoded request (an input line, or what the server made of an API call), checked the same way."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", index)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise RequestError(f"id must be a string or an integer, got {rid!r}")

    if ("prompt" in obj) == ("messages" in obj):
        raise RequestError('give exactly one of "prompt" (text) or "messages" (a list)')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise RequestError('"prompt" must be a string')
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise RequestError('"messages" must be a non-empty list')
        for i, m in enumerate(messages):
            _check_message(m, i)

    effort = obj.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise RequestError(f"reasoning_effort must be one of {EFFORTS}, got {effort!r}")
    tools = obj.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError('"tools" must be a list of function tools')
    for i, t in enumerate(tools):
        _check_tool(t, i)
    max_new = obj.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise RequestError(f"max_new_tokens must be a positive integer, got {max_new!r}")
    return Request(index=index, id=rid, messages=messages, reasoning_effort=effort, tools=tools, max_new_tokens=max_new)


def message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _check_message(m: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RequestError(f"{where} must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = m.get("content")
    text_parts = isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    )
    if not (isinstance(content, str) or text_parts or (content is None and role == "assistant")):
        raise RequestError(f"{where}: content must be a string or a list of text parts")
    if role == "assistant":
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
                raise RequestError(f"{where}: each tool call needs function.name and function.arguments (a JSON string)")
    if role == "tool" and not isinstance(m.get("name") or m.get("tool_call_id"), str):
        raise RequestError(f"{where}: a tool message needs the tool's name or the tool_call_id it answers")


def _check_tool(t: Any, i: int) -> None:
    fn = t.get("function") if isinstance(t, dict) else None
    if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
    if not isinstance(fn.get("parameters", {}), dict):
        raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object")
