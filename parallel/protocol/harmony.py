"""Harmony at the edges: requests become prompt token ids, completion token ids become final/analysis/tool calls.

The model in the middle knows nothing of harmony. These functions are pure and need no model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
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
    RenderConversationConfig,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    TextContent,
    ToolDescription,
    load_harmony_encoding,
)

from parallel.protocol.requests import Request, message_text
from parallel.protocol.tokenize import LONGEST_RUN, encode_text, long_runs

FUNCTIONS = "functions."
# The longest header a message may have (`<|start|>assistant<|channel|>commentary to=functions.name
# <|constrain|>json<|message|>` is about a dozen tokens).
MAX_HEADER_TOKENS = 32
# gpt-oss pads with <|endoftext|>; it never appears inside a rendered conversation.
PAD_TOKEN = "<|endoftext|>"
# Earlier reasoning is kept or dropped by conversation() (see _drop_finished_reasoning), not by harmony.
RENDERING = RenderConversationConfig(auto_drop_analysis=False)


# The file harmony reads o200k from: downloaded, or from the folder TIKTOKEN_ENCODINGS_BASE names.
VOCABULARY_FILE = "o200k_base.tiktoken"


class VocabularyError(OSError):
    """harmony's vocabulary cannot be had: offline without TIKTOKEN_ENCODINGS_BASE, or that folder lacks it."""


@functools.cache
def encoding() -> HarmonyEncoding:
    """o200k plus harmony's special tokens. harmony reads o200k_base.tiktoken from the folder TIKTOKEN_ENCODINGS_BASE
    names, else downloads it; where neither works its own error gives no hint, so VocabularyError says what to set."""
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        fix = (
            f"TIKTOKEN_ENCODINGS_BASE={base} must be a folder holding {VOCABULARY_FILE}"
            if base
            else f"offline, set TIKTOKEN_ENCODINGS_BASE to a folder holding {VOCABULARY_FILE}"
        )
        raise VocabularyError(
            f"harmony's vocabulary cannot be loaded ({e}): {fix} (see README.md, Offline clusters)"
        ) from None


def pad_token_id(enc: HarmonyEncoding) -> int:
    return enc.encode(PAD_TOKEN, allowed_special={PAD_TOKEN})[0]


def stop_tokens(enc: HarmonyEncoding) -> dict[int, str]:
    """The tokens that end an assistant turn, and the finish reason each means: <|call|> a tool call."""
    return {
        t: ("tool_call" if enc.decode([t]) == "<|call|>" else "stop") for t in enc.stop_tokens_for_assistant_actions()
    }


def render_prompt(enc: HarmonyEncoding, req: Request, default_effort: str, date: str | None = None) -> list[int]:
    """The request as harmony tokens, ending with `<|start|>assistant` for the model to continue. Earlier reasoning is
    kept or dropped by conversation(), not by harmony's own rule (see _drop_finished_reasoning). harmony renders it
    whole unless a text holds a run that would make its tokenizer slow (parallel/protocol/tokenize.py)."""
    conv = conversation(req, default_effort, date)
    if not any(long_runs(text) for m in conv.messages for _, text in strings(m.to_dict())):
        return enc.render_conversation_for_completion(conv, Role.ASSISTANT, RENDERING)
    return render_bounded(enc, conv)


def render_bounded(enc: HarmonyEncoding, conv: Conversation) -> list[int]:
    """As render_conversation_for_completion, with the text of each message after the system and developer ones
    encoded by encode_text, between the header and end harmony renders around an empty text. harmony renders the
    system and developer messages together (the system one mentions the developer's tools): they and the headers
    must hold no run over LONGEST_RUN."""
    head = [m for m in conv.messages if m.author.role in (Role.SYSTEM, Role.DEVELOPER)]
    tokens = enc.render_conversation(Conversation.from_messages(head), RENDERING) if head else []
    for m in conv.messages[len(head) :]:
        text = m.content[0].text if len(m.content) == 1 and isinstance(m.content[0], TextContent) else ""
        frame = m.model_copy(update={"content": [TextContent(text="")]}) if text else m
        _check_runs(frame)
        framed = enc.render(frame)
        tokens += framed[:-1] + encode_text(enc, text) + framed[-1:]
    for m in head:
        _check_runs(m)
    return tokens + enc.render_conversation_for_completion(Conversation.from_messages([]), Role.ASSISTANT, RENDERING)


def _check_runs(m: Message) -> None:
    for where, value in strings(m.to_dict()):
        if long_runs(value):
            raise ValueError(
                f"{_field(m.author.role, where)}: a run of over {LONGEST_RUN} characters with no space or "
                "other break, which only the text of a message may hold"
            )


def _field(role: Role, where: str) -> str:
    """A rendered message's field, in the request's words."""
    if role == Role.DEVELOPER:
        return "the tools" if ".tools" in where else "the instructions (system and developer messages)"
    return {".name": "a tool message's name", ".recipient": "a tool call's function name"}.get(
        where, f"a {role.value} message's {where}"
    )


def strings(obj, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a JSON-like value (dict keys too), with where it is (`.content[0].instructions`)."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from strings(key, path)
            yield from strings(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for j, value in enumerate(obj):
            yield from strings(value, f"{path}[{j}]")


def conversation(req: Request, default_effort: str, date: str | None = None) -> Conversation:
    system = SystemContent.new().with_reasoning_effort(
        ReasoningEffort((req.reasoning_effort or default_effort).title())
    )
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
            name = m.get("name") or call_names[m["tool_call_id"]]
            author = Author.new(Role.TOOL, FUNCTIONS + name)
            messages.append(
                Message.from_author_and_content(author, message_text(m["content"]))
                .with_channel("commentary")
                .with_recipient("assistant")
            )
    return Conversation.from_messages(_drop_finished_reasoning(messages))


def _drop_finished_reasoning(messages: list[Message]) -> list[Message]:
    """OpenAI's guide to gpt-oss's raw chain of thought: once the assistant has answered on the final channel, the
    analysis before that answer is dropped; the analysis since (a turn still calling tools, whose reasoning the client
    passed back) is kept until the next final answer, so the model knows why it called them. harmony 0.0.8's own rule
    differs: while the last assistant message is a tool call it keeps every earlier turn's analysis, and after a final
    answer it drops only the analysis before the first one."""
    finals = [i for i, m in enumerate(messages) if m.author.role == Role.ASSISTANT and m.channel == "final"]
    if not finals:
        return messages
    return [m for i, m in enumerate(messages) if not (i < finals[-1] and m.channel == "analysis")]


def _tool_description(fn: dict) -> ToolDescription:
    return ToolDescription.new(fn["name"], fn.get("description", ""), parameters=fn.get("parameters"))


def _assistant_messages(m: dict, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = m.get("reasoning_content") or m.get("reasoning")
    if reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    text = message_text(m.get("content"))
    if text:  # beside tool calls, text is a preamble (commentary), not the turn's final answer
        channel = "commentary" if m.get("tool_calls") else "final"
        out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel))
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
    reasoning_tokens: int = 0


class HarmonyStream:
    """Parses generated tokens one at a time. `feed` returns what each token added, as events:
      ("begin", kind, name)  a message starts: kind "reasoning" (analysis), "content" (final) or "call"
                             (a commentary message to a function; name is the function's)
      ("text", text)         more text of the current message
    Messages of other kinds (commentary preambles, messages to other recipients) give no events.
    Never raises: from the first token that is not valid harmony on, `error` says why and nothing more parses.

    Cheap a token: harmony's parser is asked only for what changed. Its `state` and `messages` cross into Rust
    and back as whole objects (tens of microseconds, growing with the output), so message boundaries are read
    from the marker tokens instead. A header longer than MAX_HEADER_TOKENS is not valid harmony: the parser
    takes any text as a header until <|message|>, at a cost that grows with it, so noise would be expensive.
    """

    def __init__(self, enc: HarmonyEncoding):
        self.parser = StreamableParser(enc, Role.ASSISTANT)
        self.parsed = Parsed()
        self.kind: str | None = None
        self.message_token, self.end_tokens = _markers(enc)
        self.in_content = False
        self.header_tokens = 0

    def feed(self, token: int) -> list[tuple]:
        if self.parsed.error:
            return []
        try:
            self.parser.process(token)
        except HarmonyError as e:
            self.parsed.error = f"model output is not valid harmony: {e}"
            return []
        if token == self.message_token:
            self.in_content, self.header_tokens = True, 0
            return self._begin()
        if token in self.end_tokens:
            self.in_content, self.kind = False, None
            return []
        if not self.in_content:
            self.header_tokens += 1
            if self.header_tokens > MAX_HEADER_TOKENS:
                self.parsed.error = (
                    f"model output is not valid harmony: no message header within {MAX_HEADER_TOKENS} tokens"
                )
            return []
        delta = self.parser.last_content_delta
        if not (delta and self.kind):
            return []
        if self.kind == "reasoning":
            self.parsed.analysis += delta
            self.parsed.reasoning_tokens += 1
        elif self.kind == "content":
            self.parsed.final += delta
        else:
            self.parsed.tool_calls[-1]["arguments"] += delta
        return [("text", delta)]

    def _begin(self) -> list[tuple]:
        self.kind, name = _kind(self.parser.current_channel, self.parser.current_recipient)
        if self.kind == "call":
            self.parsed.tool_calls.append({"name": name, "arguments": ""})
        return [("begin", self.kind, name)] if self.kind else []

    def finish(self, finished: bool) -> Parsed:
        """`finished`: the tokens ended with a stop token; otherwise the length limit cut them."""
        no_header = self.parser.state == StreamState.HEADER and (finished or not self.parser.messages)
        if self.parsed.error is None and no_header:
            self.parsed.error = (
                "model output is not valid harmony: no complete message header (<|channel|>...<|message|>)"
            )
        return self.parsed


@functools.cache
def _markers(enc: HarmonyEncoding) -> tuple[int, frozenset[int]]:
    """The token that opens a message's content, and those that end a message."""
    ids = {
        name: enc.encode(name, allowed_special="all")[0]
        for name in ("<|message|>", "<|end|>", "<|call|>", "<|return|>")
    }
    return ids.pop("<|message|>"), frozenset(ids.values())


def _kind(channel: str | None, recipient: str | None) -> tuple[str | None, str | None]:
    if recipient and recipient != "assistant":
        return "call", recipient.removeprefix(FUNCTIONS)
    return {"analysis": "reasoning", "final": "content"}.get(channel), None


def parse_completion(enc: HarmonyEncoding, tokens: list[int], finished: bool) -> Parsed:
    """Parse a whole completion (`finished` as in HarmonyStream.finish). A message the length limit cut keeps
    what was written; output that is not valid harmony comes back with `error` set and what parsed before it."""
    stream = HarmonyStream(enc)
    for token in tokens:
        stream.feed(token)
    return stream.finish(finished)
