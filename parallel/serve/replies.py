"""The OpenAI APIs' replies, built from a request's tokens as they arrive.

Each reply yields its stream's chunks as it goes (`start`, `tokens`, `end`) and ends with the whole object
(`result`), so the streamed and the non-streamed reply are one code path. Chat Completions and Responses parse
the tokens with harmony (`HarmonyReply`); the legacy Completions API decodes them as text.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Iterator

from openai_harmony import HarmonyEncoding

from parallel.protocol.harmony import HarmonyStream, Parsed
from parallel.serve.openai_api import ApiError


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class Reply:
    """Server-sent events: bare `data:` lines ending with `data: [DONE]` (Chat Completions, Completions)."""

    done = b"data: [DONE]\n\n"

    def frame(self, chunk: dict) -> bytes:
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def start(self) -> Iterator[dict]:
        return iter(())

    def tokens(self, tokens: list[int]) -> Iterator[dict]:
        raise NotImplementedError

    def end(self, reason: str) -> Iterator[dict]:
        """The request ended for `reason`: stop, tool_call or length."""
        raise NotImplementedError

    def failure(self, error: ApiError) -> dict:
        """The stream's last event when the request failed (a client that reads it raises the error)."""
        return error.body()

    def result(self) -> dict:
        raise NotImplementedError


class HarmonyReply(Reply):
    """A reply built from HarmonyStream's events: `on` each event, `finish` with what parsed."""

    def __init__(self, enc: HarmonyEncoding):
        self.stream, self.count = HarmonyStream(enc), 0

    def tokens(self, tokens: list[int]) -> Iterator[dict]:
        for token in tokens:
            self.count += 1
            for event in self.stream.feed(token):
                yield from self.on(event)

    def end(self, reason: str) -> Iterator[dict]:
        return self.finish(reason, self.stream.finish(reason in ("stop", "tool_call")), self.count)

    def on(self, event: tuple) -> Iterator[dict]:
        raise NotImplementedError

    def finish(self, reason: str, parsed: Parsed, completion_tokens: int) -> Iterator[dict]:
        raise NotImplementedError


class ChatReply(HarmonyReply):
    """A chat.completion, or the chat.completion.chunk stream that builds it."""

    def __init__(self, enc: HarmonyEncoding, model: str, prompt_tokens: int, include_usage: bool):
        super().__init__(enc)
        self.id, self.created, self.model = _new_id("chatcmpl-"), int(time.time()), model
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.message: dict = {"role": "assistant", "content": None, "reasoning": None, "tool_calls": []}
        self.kind: str | None = None

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

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
            yield self._chunk(
                {"tool_calls": [{"index": len(self.message["tool_calls"]) - 1, "function": {"arguments": text}}]}
            )
        else:
            # The raw chain of thought as `reasoning`, as OpenAI's gpt-oss guides ask (OpenRouter's convention): the
            # Agents SDK passes back only a `reasoning` field, and only when no `reasoning_content` comes with it.
            key = "reasoning" if self.kind == "reasoning" else "content"
            self.message[key] = (self.message[key] or "") + text
            yield self._chunk({key: text})

    def finish(self, reason: str, parsed: Parsed, completion_tokens: int) -> Iterator[dict]:
        self.finish_reason = {
            "tool_call": "tool_calls" if self.message["tool_calls"] else "stop",
            "length": "length",
        }.get(reason, "stop")
        self.usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": parsed.reasoning_tokens},
        }
        self.harmony_error = parsed.error
        last = self._chunk({}, self.finish_reason)
        if self.harmony_error:  # as in `result`: a streaming client learns too that the output broke, and where
            last["choices"][0]["harmony_error"] = self.harmony_error
        yield last
        if self.include_usage:
            yield {**self._chunk({}), "choices": [], "usage": self.usage}

    def result(self) -> dict:
        message = {**self.message, "tool_calls": self.message["tool_calls"] or None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        if self.harmony_error:  # what parsed is in the message; this says the rest was not valid harmony
            choice["harmony_error"] = self.harmony_error
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage,
        }


class ResponsesReply(HarmonyReply):
    """A response object, or the response.* event stream that builds it (each event named, no [DONE])."""

    done = b""

    def __init__(self, enc: HarmonyEncoding, model: str, prompt_tokens: int, max_output_tokens: int):
        super().__init__(enc)
        self.prompt_tokens = prompt_tokens
        self.response = {
            "id": _new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "in_progress",
            "output": [],
            "error": None,
            "incomplete_details": None,
            "max_output_tokens": max_output_tokens,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "store": False,
            "usage": None,
        }
        self.sequence = 0
        self.item: dict | None = None

    def frame(self, chunk: dict) -> bytes:
        return f"event: {chunk['type']}\n".encode() + super().frame(chunk)

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
            yield from self._open_item(event[1], event[2])
            return
        text = event[1]
        if self.item["type"] == "function_call":
            self.item["arguments"] += text
            yield self._event("response.function_call_arguments.delta", **self._at(), delta=text)
        else:
            self.item["content"][0]["text"] += text
            kind = "response.reasoning_text.delta" if self.item["type"] == "reasoning" else "response.output_text.delta"
            yield self._event(
                kind, **self._at(), content_index=0, delta=text, **({"logprobs": []} if "output_text" in kind else {})
            )

    def _open_item(self, kind: str, name: str | None) -> Iterator[dict]:
        if kind == "reasoning":
            self.item = {
                "type": "reasoning",
                "id": _new_id("rs_"),
                "summary": [],
                "content": [{"type": "reasoning_text", "text": ""}],
            }
        elif kind == "call":
            self.item = {
                "type": "function_call",
                "id": _new_id("fc_"),
                "call_id": _new_id("call_"),
                "name": name,
                "arguments": "",
            }
        else:
            self.item = {
                "type": "message",
                "id": _new_id("msg_"),
                "role": "assistant",
                "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}],
            }
        self.item["status"] = "in_progress"
        self.response["output"].append(self.item)
        yield self._event(
            "response.output_item.added",
            output_index=len(self.response["output"]) - 1,
            item=dict(self.item, content=[]) if "content" in self.item else dict(self.item),
        )
        if self.item["type"] != "function_call":
            yield self._event(
                "response.content_part.added", **self._at(), content_index=0, part=dict(self.item["content"][0])
            )

    def _close_item(self) -> Iterator[dict]:
        item = self.item
        if item is None:
            return
        item["status"] = "completed"
        if item["type"] == "function_call":
            yield self._event(
                "response.function_call_arguments.done", **self._at(), name=item["name"], arguments=item["arguments"]
            )
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
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": parsed.reasoning_tokens},
            "total_tokens": self.prompt_tokens + completion_tokens,
        }
        kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        yield self._event(kind, response=self.result())

    def failure(self, error: ApiError) -> dict:
        self.response.update(status="failed", error={"code": error.code or "server_error", "message": str(error)})
        return self._event("response.failed", response=self.result())

    def result(self) -> dict:
        return self.response


class CompletionReply(Reply):
    """A text_completion of the legacy Completions API: the tokens decoded as they are, special tokens as their
    text. Decoded incrementally, so a character whose bytes span two arrivals is sent whole, once."""

    def __init__(self, enc: HarmonyEncoding, model: str, prompt_tokens: int, include_usage: bool):
        self.enc, self.model, self.prompt_tokens, self.include_usage = enc, model, prompt_tokens, include_usage
        self.id, self.created = _new_id("cmpl-"), int(time.time())
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text: list[str] = []
        self.count = 0

    def _chunk(self, text: str, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _decode(self, data: bytes, final: bool = False) -> str:
        text = self.decoder.decode(data, final)
        self.text.append(text)
        return text

    def tokens(self, tokens: list[int]) -> Iterator[dict]:
        self.count += len(tokens)
        # A token may hold part of a character: its bytes, through surrogateescape, feed the UTF-8 decoder.
        data = self.enc.decode(tokens, errors="surrogateescape").encode("utf-8", "surrogateescape")
        if text := self._decode(data):
            yield self._chunk(text)

    def end(self, reason: str) -> Iterator[dict]:
        self.finish_reason = "length" if reason == "length" else "stop"
        self.usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.count,
            "total_tokens": self.prompt_tokens + self.count,
        }
        yield self._chunk(self._decode(b"", final=True), self.finish_reason)
        if self.include_usage:
            yield {**self._chunk(""), "choices": [], "usage": self.usage}

    def result(self) -> dict:
        return {**self._chunk("".join(self.text), self.finish_reason), "usage": self.usage}


def make_reply(
    api: str, enc: HarmonyEncoding, model: str, prompt_tokens: int, max_new_tokens: int, include_usage: bool
) -> Reply:
    if api == "chat":
        return ChatReply(enc, model, prompt_tokens, include_usage)
    if api == "responses":
        return ResponsesReply(enc, model, prompt_tokens, max_new_tokens)
    return CompletionReply(enc, model, prompt_tokens, include_usage)
