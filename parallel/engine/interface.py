"""What the replica loop hands a backend and gets back, the interface both backends implement, and the one place
that decides where a completion ends and why."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen. Sampled runs are reproducible per request: the noise depends on
    (seed, position), not on which other requests share the step."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # run to the token limit whatever the model says (fixed-length benchmarks)


@dataclass
class Work:
    """One request as a backend sees it: prompt tokens, a budget and how to sample. `rid` is unique in the job."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling


# (rid, tokens made since the last event, finish reason once finished: stop, tool_call, length, cancelled,
# or "error: ..." for a request that cannot run)
Event = tuple[int, list[int], "str | None"]


class Backend(Protocol):
    """A replica's generator. Every rank of the replica makes the same calls in the same order."""

    def add(self, work: list[Work]) -> None: ...

    def abort(self, rids: Iterable[int]) -> None:
        """End these requests now (their clients went away); each gets a "cancelled" event."""

    def busy(self) -> bool:
        """Whether any request added is unfinished."""

    def room(self) -> int:
        """How many more requests it would take now (0: none until some finish)."""

    def step(self, publish: Callable[[list[Event]], None], aborted: Callable[[], set[int]]) -> None:
        """Make progress on the requests added, handing their tokens to `publish` as they are made; a backend
        that cannot return between tokens asks `aborted()` (the replica's agreed answer) for requests to end."""

    def describe(self) -> str: ...


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # stop, tool_call or length


def finish_reason(token: int, made: int, limit: int, stop: dict[int, str]) -> str | None:
    """Why a request ends with `token`, its `made`-th new token, or None while it goes on: a stop token ends it
    with the reason that token means (<|call|>: tool_call), its own limit with `length`."""
    if token in stop:
        return stop[token]
    return "length" if made >= limit else None


@dataclass
class Timing:
    first_token_s: float  # the batch's prefill: time to its first generated token
    batch_s: float


def cut(tokens: list[int], limit: int, stop: dict[int, str]) -> Completion:
    """A row's tokens ended at its first stop token (the reason that token means) or at its own limit."""
    for i, token in enumerate(tokens[:limit]):
        if token in stop:
            return Completion(tokens[: i + 1], stop[token])
    return Completion(tokens[:limit], "length")
