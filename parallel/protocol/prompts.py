"""A checked request becomes what a backend runs: its harmony prompt tokens and its budget of new tokens, checked
against the model's context. The batch job and the server both go through here."""

from __future__ import annotations

from dataclasses import dataclass

from openai_harmony import HarmonyEncoding

from parallel.config import GenerationConfig
from parallel.protocol.harmony import render_prompt
from parallel.protocol.requests import Request


class PromptError(ValueError):
    """A request that cannot run; `param` names the field at fault (for an API error body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, prompt_tokens: int = 0):
        super().__init__(message)
        self.param, self.code, self.prompt_tokens = param, code, prompt_tokens


@dataclass
class Prompt:
    tokens: list[int]
    max_new_tokens: int


def prepare(enc: HarmonyEncoding, req: Request, gen: GenerationConfig, context: int) -> Prompt:
    """The request rendered with harmony, with its budget (see `budget`)."""
    try:
        tokens = render_prompt(enc, req, gen.reasoning_effort, gen.conversation_date)
    except Exception as e:  # harmony rejects what it cannot render, e.g. a tool schema it cannot type
        raise PromptError(f"cannot render the conversation with harmony: {e}", "messages") from None
    return Prompt(tokens, budget(len(tokens), req.max_new_tokens, gen, context))


def budget(prompt_tokens: int, asked: int | None, gen: GenerationConfig, context: int) -> int:
    """New tokens a prompt may make: `asked`, which must fit the context after the prompt, or else
    generation.max_new_tokens cut to what the context leaves."""
    room = context - prompt_tokens
    if room < 1:
        raise PromptError(f"the prompt's {prompt_tokens} tokens fill the model's context of {context}", "messages",
                          "context_length_exceeded", prompt_tokens)
    if asked is not None and asked > room:
        raise PromptError(f"{prompt_tokens} prompt tokens + max_new_tokens {asked} exceed the model's "
                          f"context of {context}", "max_tokens", "context_length_exceeded", prompt_tokens)
    return asked or min(gen.max_new_tokens, room)
