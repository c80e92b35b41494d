"""Harmony at the edges: requests become prompt token ids, completion token ids become final/analysis/tool calls.

The model in the middle knows nothing of harmony. These functions are pure and need no model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

from parallel.requests import Request, message_text

FUNCTIONS = "functions."
# gpt-oss pads with <|endoftext|>; it never appears inside a rendered conversation.
PAD_TOKEN = "<|endoftext|>"


@functools.cache
def encoding() -> HarmonyEncoding:
    """o200k plus harmony's special tokens. Offline, TIKTOKEN_ENCODINGS_BASE must point at o200k_base.tiktoken."""
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def pad_token_id(enc: HarmonyEncoding) -> int:
    return enc.encode(PAD_TOKEN, allowed_special={PAD_TOKEN})[0]


def render_prompt(enc: HarmonyEncoding, req: Request, default_effort: str, date: str | None = None) -> list[int]:
    """The request as harmony tokens, ending with `<|start|>assistant` for the model to continue."""
    return enc.render_conversation_for_completion(conversation(req, default_effort, date), Role.ASSISTANT)


def conversation(req: Request, default_effort: str, date: str | None = None) -> Conversation:
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort((req.reasoning_effort or default_effort).title()))
    if date:
        system = system.with_conversation_start_date(date)
    messages = [Message.from_role_and_content(Role.SYSTEM, system)]

    # As in OpenAI's gpt-oss guide: chat "system" and "developer" messages become the developer instructions.
    instructions = "\n\n".join(message_text(m["content"]) for m in req.messages if m["role"] in ("system", "developer"))
    if instructions or req.tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if req.tools:
            developer = developer.with_function_tools([_tool_description(t["function"]) for t in req.tools])
        messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))

    call_names: dict[str, str] = {}
    for m in req.messages:
        if m["role"] == "user":
            messages.append(Message.from_role_and_content(Role.USER, message_text(m["content"])))
        elif m["role"] == "assistant":
            messages.extend(_assistant_messages(m, call_names))
        elif m["role"] == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"), m.get("tool_call_id"))
            author = Author.new(Role.TOOL, FUNCTIONS + name)
            messages.append(
                Message.from_author_and_content(author, message_text(m["content"]))
                .with_channel("commentary")
                .with_recipient("assistant")
            )
    return Conversation.from_messages(messages)


def _tool_description(fn: dict) -> ToolDescription:
    return ToolDescription.new(fn["name"], fn.get("description", ""), parameters=fn.get("parameters"))


def _assistant_messages(m: dict, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = m.get("reasoning_content") or m.get("reasoning")
    if reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    text = message_text(m.get("content"))
    if text:
        out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
    for call in m.get("tool_calls") or []:
        fn = call["function"]
        if "id" in call:
            call_names[call["id"]] = fn["name"]
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, fn["arguments"])
            .with_channel("commentary")
            .with_recipient(FUNCTIONS + fn["name"])
            .with_content_type("<|constrain|>json")
        )
    return out


@dataclass
class Parsed:
    final: str = ""
    analysis: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    error: str | None = None


def parse_completion(enc: HarmonyEncoding, tokens: list[int], finished: bool) -> Parsed:
    """Parse generated tokens (`finished`: they end with a stop token; otherwise the length limit cut them).

    Never raises: output that is not valid harmony comes back with `error` set and what parsed before it.
    """
    parser = StreamableParser(enc, Role.ASSISTANT)
    error = None
    try:
        for token in tokens:
            parser.process(token)
    except HarmonyError as e:
        error = f"model output is not valid harmony: {e}"
    messages = [(m.channel, m.recipient, "".join(c.text for c in m.content)) for m in parser.messages]
    if parser.state == StreamState.CONTENT:  # cut off by the length limit mid-message: keep what was written
        messages.append((parser.current_channel, parser.current_recipient, parser.current_content))
    elif error is None and parser.state == StreamState.HEADER and (finished or not messages):
        error = "model output is not valid harmony: no complete message header (<|channel|>...<|message|>)"

    parsed = Parsed(error=error)
    for channel, recipient, text in messages:
        if recipient and recipient != "assistant":
            name = recipient.removeprefix(FUNCTIONS)
            parsed.tool_calls.append({"name": name, "arguments": text})
        elif channel == "analysis":
            parsed.analysis += text
        elif channel == "final":
            parsed.final += text
    return parsed
