"""The OpenAI Chat Completions and Responses APIs at the edge of the server, as pure functions of JSON.

A request body becomes a `Call` (the launcher's Request plus sampling and limits); a request's reply is built
from HarmonyStream's events by `ChatReply` or `ResponsesReply`, which yield the stream's chunks as they go
and end with the whole object, so the streamed and the non-streamed reply are one code path.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from parallel.protocol.harmony import Parsed
from parallel.protocol.requests import Request, RequestError, parse_request


class ApiError(Exception):
    """An error for one request, with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Call:
    request: Request
    max_tokens: int | None  # None: generation.max_new_tokens
    temperature: float | None  # None: the config's
    top_p: float | None
    ignore_eos: bool
    stream: bool
    include_usage: bool  # Chat Completions streams a usage chunk only when asked (stream_options)


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required (a string)", "model")
    if model != model_name:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")


def _optional(body: dict, key: str, kind: type | tuple, check=lambda v: True, why: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) and check(value)):
        raise ApiError(400, f"{key} must be {why or kind.__name__}, got {value!r}", key)
    return value


def _common(body: dict, max_tokens_key: str) -> dict:
    """Sampling, limits and streaming, the same on both APIs."""
    return dict(
        max_tokens=_optional(body, max_tokens_key, int, lambda v: v >= 1, "a positive integer"),
        temperature=_optional(body, "temperature", (int, float), lambda v: 0 <= v <= 2, "a number in [0, 2]"),
        top_p=_optional(body, "top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
        # vLLM's extension: run to the token limit (benchmarks with fixed output lengths).
        ignore_eos=bool(_optional(body, "ignore_eos", bool)),
        stream=bool(_optional(body, "stream", bool)),
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
}
REFUSED_CHAT = {
    "response_format": (lambda v: v == {"type": "text"}, "output cannot be constrained to a schema"),
}
REFUSED_RESPONSES = {
    "previous_response_id": (lambda v: False, NO_STATE),
    "conversation": (lambda v: False, NO_STATE),
    "background": (lambda v: v is False, "responses run in the foreground only"),
    "prompt": (lambda v: False, "there are no stored prompts"),
    "context_management": (lambda v: False, "the input is never compacted"),
    "truncation": (lambda v: v == "disabled", "an input longer than the context is refused, never truncated"),
    "text": (lambda v: isinstance(v, dict) and v.get("format", {"type": "text"}) == {"type": "text"},
             "output cannot be constrained to a schema (text.format must be text)"),
    # Reasoning items carry their text, which is what a client sends back: nothing to encrypt.
    "include": (lambda v: isinstance(v, list) and all(x == "reasoning.encrypted_content" for x in v),
                "only reasoning.encrypted_content (answered by the reasoning text itself)"),
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
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: only 'auto' and 'none' are supported (harmony cannot force a call)", "tool_choice")
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list", "tools")
    return [] if choice == "none" else [to_chat(t) for t in tools]


def chat_call(body: dict, model_name: str) -> Call:
    """POST /v1/chat/completions -> Call."""
    _check_model(body, model_name)
    if "messages" not in body:
        raise ApiError(400, "messages is required", "messages")
    _refuse(body, REFUSED | REFUSED_CHAT)
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only 1 choice per request is supported", "n")
    common = _common(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    options = body.get("stream_options") or {}
    request = _request({
        "messages": body["messages"],
        "tools": _tools(body, lambda t: t),
        "reasoning_effort": body.get("reasoning_effort"),
    })
    return Call(request, include_usage=bool(isinstance(options, dict) and options.get("include_usage")), **common)


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
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    reasoning = ""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"input[{i}] must be an object", "input")
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning += "".join(part.get("text", "") for part in item.get("content") or [])
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and last.get("tool_calls") is not None and not reasoning:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "reasoning": reasoning or None, "tool_calls": [call]})
            reasoning = ""
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _input_text(item.get("output"), i)})
        elif kind == "message":
            message = {"role": item.get("role"), "content": _input_text(item.get("content"), i)}
            if message["role"] == "assistant" and reasoning:
                message["reasoning"], reasoning = reasoning, ""
            messages.append(message)
        else:
            raise ApiError(400, f"input[{i}]: items of type {kind!r} are not supported", "input")
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    request = _request({"messages": messages, "tools": _tools(body, _chat_tool), "reasoning_effort": effort})
    return Call(request, include_usage=True, **_common(body, "max_output_tokens"))


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


class ChatReply:
    """A chat.completion, or the chat.completion.chunk stream that builds it."""

    def __init__(self, model: str, prompt_tokens: int, include_usage: bool):
        self.id, self.created, self.model = _new_id("chatcmpl-"), int(time.time()), model
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.message: dict = {"role": "assistant", "content": None, "reasoning": None, "tool_calls": []}
        self.kind: str | None = None

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [choice]}

    def start(self) -> Iterator[dict]:
        yield self._chunk({"role": "assistant", "content": ""})

    def on(self, event: tuple) -> Iterator[dict]:
        if event[0] == "begin":
            self.kind = event[1]
            if self.kind == "call":
                call = {"id": _new_id("call_"), "type": "function", "function": {"name": event[2], "arguments": ""}}
                self.message["tool_calls"].append(call)
                yield self._chunk({"tool_calls": [{"index": len(self.message["tool_calls"]) - 1, **call}]})
            return
        text = event[1]
        if self.kind == "call":
            self.message["tool_calls"][-1]["function"]["arguments"] += text
            yield self._chunk({"tool_calls": [{"index": len(self.message["tool_calls"]) - 1, "function": {"arguments": text}}]})
        else:
            # The raw chain of thought as `reasoning`, as OpenAI's gpt-oss guides ask (OpenRouter's convention): the
            # Agents SDK passes back only a `reasoning` field, and only when no `reasoning_content` comes with it.
            key = "reasoning" if self.kind == "reasoning" else "content"
            self.message[key] = (self.message[key] or "") + text
            yield self._chunk({key: text})

    def finish(self, reason: str, parsed: Parsed, completion_tokens: int) -> Iterator[dict]:
        self.finish_reason = {"tool_call": "tool_calls" if self.message["tool_calls"] else "stop", "length": "length"}.get(reason, "stop")
        self.usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": self.prompt_tokens + completion_tokens,
                      "completion_tokens_details": {"reasoning_tokens": parsed.reasoning_tokens}}
        self.harmony_error = parsed.error
        yield self._chunk({}, self.finish_reason)
        if self.include_usage:
            yield {**self._chunk({}), "choices": [], "usage": self.usage}

    def result(self) -> dict:
        message = {**self.message, "tool_calls": self.message["tool_calls"] or None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        if self.harmony_error:  # what parsed is in the message; this says the rest was not valid harmony
            choice["harmony_error"] = self.harmony_error
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage}


class ResponsesReply:
    """A response object, or the response.* event stream that builds it."""

    def __init__(self, model: str, prompt_tokens: int, max_output_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.response = {
            "id": _new_id("resp_"), "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "output": [], "error": None, "incomplete_details": None,
            "max_output_tokens": max_output_tokens, "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
            "store": False, "usage": None,
        }
        self.sequence = 0
        self.item: dict | None = None

    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def _at(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.response["output"]) - 1}

    def start(self) -> Iterator[dict]:
        yield self._event("response.created", response=dict(self.response))
        yield self._event("response.in_progress", response=dict(self.response))

    def on(self, event: tuple) -> Iterator[dict]:
        if event[0] == "begin":
            yield from self._close_item()
            kind = event[1]
            if kind == "reasoning":
                self.item = {"type": "reasoning", "id": _new_id("rs_"), "summary": [], "content": [{"type": "reasoning_text", "text": ""}]}
            elif kind == "call":
                self.item = {"type": "function_call", "id": _new_id("fc_"), "call_id": _new_id("call_"), "name": event[2], "arguments": ""}
            else:
                self.item = {"type": "message", "id": _new_id("msg_"), "role": "assistant",
                             "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            self.item["status"] = "in_progress"
            self.response["output"].append(self.item)
            yield self._event("response.output_item.added", output_index=len(self.response["output"]) - 1, item=dict(self.item, content=[]) if "content" in self.item else dict(self.item))
            if self.item["type"] != "function_call":
                yield self._event("response.content_part.added", **self._at(), content_index=0, part=dict(self.item["content"][0]))
            return
        text = event[1]
        if self.item["type"] == "function_call":
            self.item["arguments"] += text
            yield self._event("response.function_call_arguments.delta", **self._at(), delta=text)
        else:
            self.item["content"][0]["text"] += text
            kind = "response.reasoning_text.delta" if self.item["type"] == "reasoning" else "response.output_text.delta"
            yield self._event(kind, **self._at(), content_index=0, delta=text, **({"logprobs": []} if "output_text" in kind else {}))

    def _close_item(self) -> Iterator[dict]:
        item = self.item
        if item is None:
            return
        item["status"] = "completed"
        if item["type"] == "function_call":
            yield self._event("response.function_call_arguments.done", **self._at(), name=item["name"], arguments=item["arguments"])
        else:
            part = item["content"][0]
            kind = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            yield self._event(kind, **self._at(), content_index=0, text=part["text"])
            yield self._event("response.content_part.done", **self._at(), content_index=0, part=dict(part))
        yield self._event("response.output_item.done", output_index=len(self.response["output"]) - 1, item=dict(item))
        self.item = None

    def finish(self, reason: str, parsed: Parsed, completion_tokens: int) -> Iterator[dict]:
        yield from self._close_item()
        if reason == "length":
            self.response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        else:
            self.response["status"] = "completed"
        if parsed.error:
            self.response["harmony_error"] = parsed.error
        self.response["usage"] = {
            "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": parsed.reasoning_tokens},
            "total_tokens": self.prompt_tokens + completion_tokens,
        }
        kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        yield self._event(kind, response=self.result())

    def result(self) -> dict:
        return self.response
