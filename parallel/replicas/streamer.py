"""A serving replica's leader: its reporter for the replica loop (parallel/replicas/loop.py), which sends
the server's API process the tokens its backend makes, `server.stream_interval` steps' worth at a time (a
request's first token and its end at once: time to first token and completion are never held back)."""

from __future__ import annotations

from collections.abc import Callable

from parallel.engine.interface import Event, Work
from parallel.replicas.channel import Link


class TokenStreamer:
    """`stats`: the backend's counts, sent with each message of tokens (the server's /metrics reads them)."""

    def __init__(self, interval: int, stats: Callable[[], dict[str, int]] = dict):
        self.interval, self.stats = interval, stats
        self.pending: dict[int, Event] = {}  # rid -> its tokens since the last send
        self.started: set[int] = set()  # requests whose first token was sent
        self.urgent = False
        self.steps = 0

    def add(self, work: list[Work]) -> None:
        pass

    def events(self, events: list[Event]) -> None:
        for event in events:
            held = self.pending.get(event.rid)
            self.pending[event.rid] = event if held is None else event._replace(tokens=held.tokens + event.tokens)
            if event.reason is not None or event.rid not in self.started:
                self.urgent = True
                self.started.add(event.rid)
            if event.reason is not None:
                self.started.discard(event.rid)

    def flush(self, link: Link) -> None:
        self.steps += 1
        if self.pending and (self.urgent or self.steps >= self.interval):
            events = list(self.pending.values())
            link.send(("events", events, [e.rid for e in events if e.reason is not None], self.stats()))
            self.pending, self.urgent, self.steps = {}, False, 0
