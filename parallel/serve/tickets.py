"""The API process's side of serving (api_process.py): each API request becomes a ticket whose tokens arrive
as the replicas make them.

The HTTP handlers submit tickets here; the dispatcher (parallel/replicas/dispatcher.py) hands their work to
whichever replica has room, and routes back what the replicas' leaders send (parallel/replicas/streamer.py): each
request's tokens go to its ticket, on the event loop that waits for them, so no client ever waits on another and
a slow client never slows the engine. A request joins its replica's running ones at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass

from parallel.engine.interface import Event, Work
from parallel.replicas.channel import Hub
from parallel.replicas.dispatcher import Dispatcher


@dataclass(eq=False)
class Ticket:
    """A submitted request: lists of new token ids arrive on `queue`, then its finish reason (a str: stop,
    tool_call, length, cancelled, or "error: ..."). Given the event loop that reads it, an asyncio queue;
    else a thread-safe one."""

    work: Work
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False

    def __post_init__(self):
        self.queue = asyncio.Queue() if self.loop else queue.Queue()

    def put(self, item: list[int] | str) -> None:
        """Thread-safe: hands an item to whoever waits on the ticket."""
        hand_over([(self, item)])


def hand_over(items: list[tuple[Ticket, list[int] | str]]) -> None:
    """Thread-safe: each item to its ticket, in order, with one wake-up of each event loop that waits on some of
    them: a step of 256 streams is one call into the HTTP loop, not 256 (each a write to its wake-up pipe)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[int] | str]]] = {}
    for ticket, item in items:
        if ticket.loop:
            by_loop.setdefault(ticket.loop, []).append((ticket.queue, item))
        else:
            ticket.queue.put(item)
    for loop, puts in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, puts)
        except RuntimeError:  # the loop is closed (the server stopped): no one waits, and the dispatcher goes on
            pass


def _put_all(puts: list[tuple[asyncio.Queue, list[int] | str]]) -> None:
    for waiting, item in puts:
        waiting.put_nowait(item)


class Tickets:
    """Every request in flight, as a ticket its tokens are routed to, and the dispatcher that hands their work out."""

    def __init__(self, hub: Hub, replicas: int):
        self.dispatcher = Dispatcher(hub, replicas, self.deliver, self.replica_gone)
        self.lock = threading.Lock()
        self.tickets: dict[int, Ticket] = {}
        self.ids = itertools.count()
        self.generating: dict[int, int] = {}  # rid -> its replica, from its first token to its end
        self.stats = {"requests": 0, "largest_batch": 0}  # largest_batch: most requests generating on one replica

    def next_id(self) -> int:
        return next(self.ids)

    def submit(self, ticket: Ticket) -> None:
        with self.lock:
            self.tickets[ticket.work.rid] = ticket
            self.stats["requests"] += 1
        self.dispatcher.submit([ticket.work])

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: drop its request if it waits, else end it at its replica's next step."""
        ticket.cancelled = True
        if not self.dispatcher.abort(ticket.work.rid):
            self._finish(ticket.work.rid, "cancelled")

    def deliver(self, kind: str, events: list[Event]) -> None:
        """The dispatcher's hand-off: each event's tokens to its ticket, and its finish reason once finished."""
        items = []
        with self.lock:
            for event in events:
                ticket = self.tickets.get(event.rid)
                if ticket is None:
                    continue
                if event.tokens:
                    items.append((ticket, event.tokens))
                if event.reason is None:
                    self._generating(event.rid)
                else:
                    self._end(event.rid)
                    items.append((ticket, event.reason))
        hand_over(items)

    def _generating(self, rid: int) -> None:
        """The request makes tokens on its replica (lock held)."""
        replica = self.dispatcher.owner.get(rid)
        if rid in self.generating or replica is None:
            return
        self.generating[rid] = replica
        together = sum(r == replica for r in self.generating.values())
        self.stats["largest_batch"] = max(self.stats["largest_batch"], together)

    def _end(self, rid: int) -> Ticket | None:
        """The request is over: forget it (lock held)."""
        self.generating.pop(rid, None)
        return self.tickets.pop(rid, None)

    def _finish(self, rid: int, reason: str) -> None:
        with self.lock:
            ticket = self._end(rid)
        if ticket is not None:
            ticket.put(reason)

    def cut_all(self, reason: str) -> int:
        """End every request still in flight with `reason` (the drain deadline passed); how many there were."""
        with self.lock:
            rids = list(self.tickets)
        for rid in rids:
            self.dispatcher.abort(rid)
            self._finish(rid, reason)
        return len(rids)

    def replica_gone(self, replica: int) -> None:
        """A replica's leader died: its requests cannot finish."""
        for rid, owner in list(self.dispatcher.owner.items()):
            if owner == replica:
                self._finish(rid, f"error: replica {replica} is gone")

    def in_flight(self) -> int:
        with self.lock:
            return len(self.tickets)

    def status(self) -> dict:
        with self.lock:
            mine = {
                "requests_in_flight": len(self.tickets),
                "running_batches": len(set(self.generating.values())),
                **self.stats,
            }
        return {**mine, **self.dispatcher.status()}
