"""Input lines: one JSON request per line, checked here so that a bad line costs that line only.

Every field that rendering reads (parallel/protocol/harmony.py) is checked here for its type and shape, so that
a wrong one is a RequestError naming it (`messages[2].tool_calls must be a list`), never a TypeError later.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from parallel.config import Effort

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = tuple(e.value for e in Effort)
TEXT_PART = '{"type": "text", "text": ...}'
# OpenAI's names for a request's token budget, taken as well as ours (a line written for OpenAI's batch API).
BUDGET_KEYS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
# A request's own sampling, for input lines and the server alike: key -> (accepted, what it must be).
SAMPLING = {
    "temperature": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    # The engine's sampling noise is a hash of the seed as a signed 64-bit integer.
    "seed": (lambda v: isinstance(v, int) and -(2**63) <= v < 2**63, "a 64-bit signed integer"),
}


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
    # The line's own sampling; None: the job's (generation.*; the seed is generation.seed plus the line number).
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


def is_id(value: Any) -> bool:
    """Ids are strings or integers; JSON's true and false are neither (though Python's True == 1)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def load_json(line: str | bytes) -> Any:
    """One line's JSON. Bytes are decoded here, a line at a time, so that a bad byte costs its line only; a UTF-8
    byte order mark at the start of a line is dropped."""
    try:
        return json.loads((line.decode() if isinstance(line, bytes) else line).removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise RequestError(f"not UTF-8: byte {e.object[e.start]:#04x} at column {e.start + 1}") from None
    except RecursionError:
        raise RequestError("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python converts
        raise RequestError(f"not valid JSON: {json_problem(e, one_line=True)}") from None


def json_problem(e: ValueError, one_line: bool) -> str:
    """What json.loads found wrong, in the writer's terms. In a line of a file, where in that line (the parser
    counts the line's own newline as a second line); an integer too long for Python, without Python's advice
    on raising its limit."""
    if isinstance(e, json.JSONDecodeError):
        if not one_line:
            return str(e)
        return (
            f"{e.msg} at the end of the line" if e.pos >= len(e.doc.rstrip()) else f"{e.msg} at character {e.pos + 1}"
        )
    if "integer string conversion" in str(e):
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return str(e)


def parse_line(line: str | bytes, index: int) -> Request:
    """Parse one input line, raising RequestError with a message that says what is wrong."""
    return parse_request(load_json(line), index)


def parse_request(obj: Any, index: int) -> Request:
    """A decoded request (an input line, or what the server made of an API call), checked the same way."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
    if obj.get("stop") not in (None, "", []):
        raise RequestError('"stop" is not supported: a completion ends where the model ends its turn')
    rid = obj.get("id", index)
    if not is_id(rid):
        raise RequestError(f"id must be a string or an integer, got {rid!r:.60}")
    effort = obj.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise RequestError(f"reasoning_effort must be one of {EFFORTS}, got {effort!r:.60}")
    budget = [key for key in BUDGET_KEYS if obj.get(key) is not None]
    if len(budget) > 1:
        raise RequestError(f"give one token budget, not {' and '.join(budget)}")
    max_new = obj[budget[0]] if budget else None
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise RequestError(f"{budget[0]} must be a positive integer, got {max_new!r:.60}")
    sampling = {key: obj.get(key) for key in SAMPLING}
    for key, value in sampling.items():
        accepted, what = SAMPLING[key]
        if value is not None and (isinstance(value, bool) or not accepted(value)):
            raise RequestError(f"{key} must be {what}, got {value!r:.60}")
    return Request(
        index=index,
        id=rid,
        messages=_messages(obj),
        reasoning_effort=effort,
        tools=_tools(obj),
        max_new_tokens=max_new,
        **sampling,
    )


def message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _messages(obj: dict) -> list[dict]:
    if ("prompt" in obj) == ("messages" in obj):
        raise RequestError('give exactly one of "prompt" (text) or "messages" (a list)')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise RequestError('"prompt" must be a string')
        return [{"role": "user", "content": obj["prompt"]}]
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list')
    call_ids: set[str] = set()  # the ids of the tool calls so far, which a tool message may answer
    for i, m in enumerate(messages):
        _check_message(m, f"messages[{i}]", call_ids)
    return messages


def _check_message(m: Any, where: str, call_ids: set[str]) -> None:
    if not isinstance(m, dict):
        raise RequestError(f"{where} must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}: unknown role {role!r:.60} (expected one of {', '.join(ROLES)})")
    _check_content(m.get("content"), f"{where}.content", may_be_null=role == "assistant")
    if role == "assistant":
        _check_strings(m, where, "reasoning_content", "reasoning")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise RequestError(f"{where}.tool_calls must be a list")
        for j, call in enumerate(calls or []):
            _check_call(call, f"{where}.tool_calls[{j}]")
            call_ids.add(call.get("id"))
    if role == "tool":
        _check_strings(m, where, "name", "tool_call_id")
        if not (m.get("name") or m.get("tool_call_id")):
            raise RequestError(f"{where}: a tool message needs the tool's name or the tool_call_id it answers")
        # Its author is the tool the call named: an id no call had would make the result come from no tool.
        if not m.get("name") and m["tool_call_id"] not in call_ids:
            raise RequestError(f"{where}.tool_call_id {m['tool_call_id']!r:.60} answers no earlier tool call")


def _check_content(content: Any, where: str, may_be_null: bool) -> None:
    if isinstance(content, str) or (content is None and may_be_null):
        return
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of text parts {TEXT_PART}")
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise RequestError(f"{where}[{j}] must be a text part {TEXT_PART}")


def _check_call(call: Any, where: str) -> None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise RequestError(
            f'{where} must be {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": ...}}}}'
        )
    _check_strings(call, where, "id")
    for key in ("name", "arguments"):
        if not isinstance(fn.get(key), str):
            raise RequestError(
                f"{where}.function.{key} must be a string" + (" (the call's JSON)" if key == "arguments" else "")
            )


def _tools(obj: dict) -> list[dict]:
    tools = obj.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError('"tools" must be a list of function tools')
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(fn, dict) and t.get("type") == "function" and isinstance(fn.get("name"), str)):
            raise RequestError(
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}'
            )
        # Absent, not null: harmony takes a missing description as "" but refuses None.
        if "description" in fn and not isinstance(fn["description"], str):
            raise RequestError(f"tools[{i}].function.description must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def _check_strings(obj: dict, where: str, *keys: str) -> None:
    """Optional text fields: absent, null or a string."""
    for key in keys:
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise RequestError(f"{where}.{key} must be a string")
