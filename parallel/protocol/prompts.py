"""A checked request becomes what a backend runs: its harmony prompt tokens and its budget of new tokens, checked
against the model's context. The batch job and the server both go through here."""

from __future__ import annotations

from dataclasses import dataclass

from openai_harmony import HarmonyEncoding

from parallel.config import GenerationConfig
from parallel.protocol.harmony import render_prompt, strings
from parallel.protocol.requests import Request

# The most bytes one o200k token holds.
TOKEN_BYTES = 128


class PromptError(ValueError):
    """A request that cannot run; `param` names the field at fault (for an API error body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, prompt_tokens: int = 0):
        super().__init__(message)
        self.param, self.code, self.prompt_tokens = param, code, prompt_tokens


@dataclass
class Prompt:
    tokens: list[int]
    max_new_tokens: int


def prepare(
    enc: HarmonyEncoding, req: Request, gen: GenerationConfig, context: int, budget: str = "max_new_tokens"
) -> Prompt:
    """The request rendered with harmony, with its budget (see `fit`; generation.max_new_tokens by default). A
    request whose text cannot fit the context however it tokenizes is refused before it is tokenized."""
    size = sum(len(text) for _, text in strings([req.messages, req.tools]))
    if size > context * TOKEN_BYTES:
        raise PromptError(
            f"the prompt holds over {context * TOKEN_BYTES} characters, which cannot fit the model's "
            f"context of {context} tokens (a token holds at most {TOKEN_BYTES} bytes)",
            "messages",
            "context_length_exceeded",
        )
    try:
        tokens = render_prompt(enc, req, gen.reasoning_effort, gen.conversation_date)
    except Exception as e:  # harmony rejects what it cannot render, e.g. a tool schema it cannot type
        raise PromptError(f"cannot render the conversation with harmony: {e}", "messages") from None
    return fit(tokens, req.max_new_tokens, gen.max_new_tokens, context, "messages", budget)


def fit(
    tokens: list[int],
    max_new_tokens: int | None,
    default: int,
    context: int,
    param: str,
    budget: str = "max_new_tokens",
) -> Prompt:
    """Prompt tokens with their budget: `max_new_tokens` as asked, which must fit the context after the prompt,
    or else `default` cut to what the context leaves. `param` and `budget` name the prompt's field and the
    budget's in errors (the request's own names: `max_tokens`, `max_output_tokens`, ...)."""
    room = context - len(tokens)
    if room < 1:
        raise PromptError(
            f"the prompt's {len(tokens)} tokens fill the model's context of {context}",
            param,
            "context_length_exceeded",
            len(tokens),
        )
    if max_new_tokens is not None and max_new_tokens > room:
        raise PromptError(
            f"{len(tokens)} prompt tokens + {budget} {max_new_tokens} exceed the model's context of {context}",
            budget,
            "context_length_exceeded",
            len(tokens),
        )
    return Prompt(tokens, max_new_tokens or min(default, room))
