"""What the replica loop hands a backend and gets back, the interface both backends implement, and the one place
that decides where a completion ends and why."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


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
    """One request as a backend sees it: prompt tokens, a budget and how to sample. `rid` is unique in the job;
    `tag` rides along for whoever made the request (a batch job's id and line number)."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    tag: Any = None


class Event(NamedTuple):
    """Tokens a request made since its last event. Its last event says why it ended: stop, tool_call, length,
    cancelled, or "error: ..." for a request that cannot run; and how long it waited to be admitted and then
    for its first token."""

    rid: int
    tokens: list[int]
    reason: str | None = None
    queued_s: float = 0.0
    first_token_s: float = 0.0


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

    def stats(self) -> dict[str, int]:
        """Its counts now, by their names on the server's /metrics (parallel/serve/metrics.py): requests running
        and waiting, KV-cache blocks in use and in all, preemptions and prefix-cache hits so far (those it has)."""

    def summary(self) -> str:
        """What it did, for the log at the end."""

    def close(self) -> None:
        """Let go of what it holds on the device beyond the model (the engine's CUDA graphs); it may not generate
        after this."""


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


def complete(backend: Backend, work: list[Work]) -> dict[int, tuple[list[int], Event]]:
    """Run `work` on a backend of one rank until every request has ended: each request's tokens and last event."""
    tokens: dict[int, list[int]] = {w.rid: [] for w in work}
    last: dict[int, Event] = {}

    def publish(events: list[Event]) -> None:
        for event in events:
            tokens[event.rid] += event.tokens
            if event.reason is not None:
                last[event.rid] = event

    backend.add(work)
    while backend.busy():
        backend.step(publish, set)
    return {rid: (tokens[rid], last[rid]) for rid in tokens}
