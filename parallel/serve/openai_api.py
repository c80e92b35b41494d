"""The OpenAI APIs' requests at the edge of the server, as pure functions of JSON.

A request body becomes a `Call`: what to generate from (a conversation to render with harmony, or for the
legacy Completions API a raw prompt) and `Options` (sampling, limits, streaming). Anything the server cannot do
as asked is an ApiError naming the field, never a silent change of meaning. Replies are in `replies.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from parallel.protocol.requests import SAMPLING, Request, RequestError, parse_request


class ApiError(Exception):
    """An error for one request, with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def __reduce__(self):  # raised in a worker process, rebuilt in the server's
        return ApiError, (self.status, str(self), self.param, self.code)

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Options:
    """How to generate, as the request asks; None: the config's."""

    max_tokens: int | None
    max_tokens_key: str  # the request's name for max_tokens, for its errors
    temperature: float | None
    top_p: float | None
    seed: int | None
    ignore_eos: bool
    stream: bool
    include_usage: bool  # Chat and Completions stream a usage chunk only when asked (stream_options)


@dataclass
class Call:
    options: Options
    request: Request | None = None  # a conversation, rendered with harmony (Chat Completions, Responses)
    prompt: str | list[int] | None = None  # a raw prompt: text (o200k tokens) or token ids (Completions)


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required (a string)", "model")
    if model != model_name:
        raise ApiError(
            404, f"The model {model!r} does not exist; this server serves {model_name!r}", "model", "model_not_found"
        )


def _optional(body: dict, key: str, kind: type | tuple, check=lambda v: True, why: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) and check(value)):
        raise ApiError(400, f"{key} must be {why or kind.__name__}, got {value!r}", key)
    return value


def _options(body: dict, max_tokens_key: str, usage: bool | None = None) -> Options:
    """Sampling, limits and streaming, the same on every API. `usage`: None where stream_options decides."""
    _optional(body, "n", int, lambda v: v == 1, "1 (one choice per request)")
    stream_options = _optional(body, "stream_options", dict, why="an object")
    if usage is None:
        usage = bool(stream_options and stream_options.get("include_usage"))
    return Options(
        max_tokens=_optional(body, max_tokens_key, int, lambda v: v >= 1, "a positive integer"),
        max_tokens_key=max_tokens_key,
        # The same checks as an input line's (each rule checks its value's type).
        temperature=_optional(body, "temperature", object, *SAMPLING["temperature"]),
        top_p=_optional(body, "top_p", object, *SAMPLING["top_p"]),
        seed=_optional(body, "seed", object, *SAMPLING["seed"]),
        # vLLM's extension: run to the token limit (benchmarks with fixed output lengths).
        ignore_eos=bool(_optional(body, "ignore_eos", bool)),
        stream=bool(_optional(body, "stream", bool)),
        include_usage=usage,
    )


# Fields a client may send whose meaning this server cannot give, refused by name rather than ignored: field -> (the
# values it can honour, why not the others). Fields not named here change nothing about the tokens and are ignored:
# store (nothing is stored; a response says store: false), parallel_tool_calls (gpt-oss calls one function a turn,
# which holds under either value), metadata, user, service_tier, verbosity..., and a function tool's `strict` (its
# arguments are not constrained to its schema).
NO_STATE = "this server stores no responses or conversations: send the whole input"
REFUSED = {
    "logprobs": (lambda v: v is False, "this server returns no log probabilities"),
    "top_logprobs": (lambda v: v == 0, "this server returns no log probabilities"),
    "frequency_penalty": (lambda v: v == 0, "no penalties are applied"),
    "presence_penalty": (lambda v: v == 0, "no penalties are applied"),
    "logit_bias": (lambda v: v == {}, "no logit bias is applied"),
}
REFUSED_CHAT = {
    "response_format": (lambda v: v == {"type": "text"}, "output cannot be constrained to a schema"),
    "stop": (lambda v: v in ("", []), "no stop sequences: a reply ends where the model ends its turn"),
    # The deprecated form of tools: a client that sends it would get a reply that never calls them.
    "functions": (lambda v: v == [], "send them as tools"),
    "function_call": (lambda v: v in ("auto", "none"), "send tool_choice"),
}
REFUSED_RESPONSES = {
    "previous_response_id": (lambda v: False, NO_STATE),
    "conversation": (lambda v: False, NO_STATE),
    "background": (lambda v: v is False, "responses run in the foreground only"),
    "prompt": (lambda v: False, "there are no stored prompts"),
    "context_management": (lambda v: False, "the input is never compacted"),
    "truncation": (lambda v: v == "disabled", "an input longer than the context is refused, never truncated"),
    "text": (
        lambda v: isinstance(v, dict) and v.get("format", {"type": "text"}) == {"type": "text"},
        "output cannot be constrained to a schema (text.format must be text)",
    ),
    # Reasoning items carry their text, which is what a client sends back: nothing to encrypt.
    "include": (
        lambda v: isinstance(v, list) and all(x == "reasoning.encrypted_content" for x in v),
        "only reasoning.encrypted_content (answered by the reasoning text itself)",
    ),
}


def _refuse(body: dict, rules: dict) -> None:
    for key, (honoured, why) in rules.items():
        if body.get(key) is not None and not honoured(body[key]):
            raise ApiError(400, f"{key}={json.dumps(body[key]):.100} is not supported: {why}", key)


def _request(obj: dict) -> Request:
    try:
        return parse_request(obj, index=0)
    except RequestError as e:
        raise ApiError(400, str(e)) from None


def _tools(body: dict, to_chat) -> list:
    tools = _optional(body, "tools", list, why="a list") or []
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(
            400, "tool_choice: only 'auto' and 'none' are supported (harmony cannot force a call)", "tool_choice"
        )
    return [] if choice == "none" else [to_chat(t) for t in tools]


def chat_call(body: dict, model_name: str) -> Call:
    """POST /v1/chat/completions -> Call."""
    _check_model(body, model_name)
    if "messages" not in body:
        raise ApiError(400, "messages is required", "messages")
    _refuse(body, REFUSED | REFUSED_CHAT)
    newer = body.get("max_completion_tokens") is not None
    options = _options(body, "max_completion_tokens" if newer else "max_tokens")
    request = _request(
        {
            "messages": body["messages"],
            "tools": _tools(body, lambda t: t),
            "reasoning_effort": body.get("reasoning_effort"),
        }
    )
    return Call(options, request=request)


# Completions fields that would change what comes back, which this server cannot honour: refused, not ignored.
UNSUPPORTED_COMPLETION = {"echo": False, "suffix": None, "logprobs": None, "best_of": 1, "stop": None}


def completion_call(body: dict, model_name: str) -> Call:
    """POST /v1/completions (the legacy API, as vLLM serves it) -> Call: a raw prompt, no harmony."""
    _check_model(body, model_name)
    for key, default in UNSUPPORTED_COMPLETION.items():
        if body.get(key) not in (None, default, [], ""):
            raise ApiError(400, f"{key} is not supported by this server", key)
    _refuse(body, REFUSED)
    prompt = body.get("prompt")
    ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids) or not prompt:
        raise ApiError(
            400, "prompt must be a non-empty string or a non-empty list of token ids (one prompt a request)", "prompt"
        )
    return Call(_options(body, "max_tokens"), prompt=prompt)


def responses_call(body: dict, model_name: str) -> Call:
    """POST /v1/responses -> Call. Input items map onto chat messages: reasoning items ride on the assistant
    message that follows them, function calls become its tool_calls, and call outputs become tool messages."""
    _check_model(body, model_name)
    _refuse(body, REFUSED | REFUSED_RESPONSES)
    if "input" not in body:
        raise ApiError(400, "input is required", "input")
    items = body["input"]
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise ApiError(400, "input must be a string or a list of items", "input")
    instructions = _optional(body, "instructions", str, why="a string")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    reasoning = ""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"input[{i}] must be an object", "input")
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning += _reasoning_text(item.get("content"), i)
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and last.get("tool_calls") is not None and not reasoning:
                last["tool_calls"].append(call)
            else:
                messages.append(
                    {"role": "assistant", "content": None, "reasoning": reasoning or None, "tool_calls": [call]}
                )
            reasoning = ""
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": _input_text(item.get("output"), i)}
            )
        elif kind == "message":
            message = {"role": item.get("role"), "content": _input_text(item.get("content"), i)}
            if message["role"] == "assistant" and reasoning:
                message["reasoning"], reasoning = reasoning, ""
            messages.append(message)
        else:
            raise ApiError(400, f"input[{i}]: items of type {kind!r} are not supported", "input")
    effort = (_optional(body, "reasoning", dict, why='an object ({"effort": ...})') or {}).get("effort")
    request = _request({"messages": messages, "tools": _tools(body, _chat_tool), "reasoning_effort": effort})
    return Call(_options(body, "max_output_tokens", usage=True), request=request)


def _reasoning_text(content: Any, i: int) -> str:
    parts = content or []
    if not (isinstance(parts, list) and all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in parts)):
        raise ApiError(400, f"input[{i}]: a reasoning item's content must be a list of text parts", "input")
    return "".join(part.get("text", "") for part in parts)


def _input_text(content: Any, i: int) -> Any:
    """Responses content parts (input_text / output_text) as chat text parts."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") for p in content):
        raise ApiError(400, f"input[{i}]: only text content is supported", "input")
    return [{"type": "text", "text": p.get("text")} for p in content]


def _chat_tool(tool: Any) -> Any:
    """A Responses function tool ({"type", "name", "parameters"}) in Chat Completions' shape."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ApiError(400, "tools: only function tools are supported", "tools")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}}
