"""The loop every rank of a replica runs, for the batch job and the server alike.

The replica's leader asks rank 0 for work whenever its backend has room, and each iteration tells the other
ranks of its replica what arrived (new requests, aborts, the order to stop) with one broadcast on a CPU group;
then every rank steps its backend on the same inputs. The leader hands what the backend makes to a reporter,
which decides what goes back to rank 0 and when (records of finished requests for a batch job, token deltas
for a server's streams). The loop ends once rank 0 has said stop and the backend holds nothing unfinished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch.distributed as dist

from parallel.distributed.mesh import Placement
from parallel.engine.interface import Backend, Event, Work
from parallel.log import log
from parallel.replicas.channel import Link

# An idle leader still tells its replica this often that nothing came: a quiet server is not a hung collective.
IDLE_BEAT_S = 5.0


class Reporter(Protocol):
    def add(self, work: list[Work]) -> None:
        """Requests the leader hands its backend."""

    def events(self, events: list[Event]) -> None:
        """What the backend made, as it makes it (the leader only)."""

    def flush(self, link: Link) -> None:
        """End of a loop iteration: send rank 0 whatever is due."""


@dataclass
class News:
    work: list[Work] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)
    stop: bool = False


class Replica:
    def __init__(self, place: Placement, backend: Backend, link: Link | None, reporter: Reporter | None):
        self.place, self.backend, self.link, self.reporter = place, backend, link, reporter
        self.asked = 0  # requests asked of rank 0 and not yet received
        self.stopping = False
        self.held = News()  # what reached the leader while a backend could not take it (mid-batch)

    def run(self) -> None:
        start = time.perf_counter()
        while True:
            news = self._sync(self._collect(block=not self.backend.busy()) if self.place.is_leader else None)
            if self.place.is_leader:
                self.reporter.add(news.work)
            self.backend.add(news.work)
            self.backend.abort(news.aborts)
            self.stopping |= news.stop
            if self.backend.busy():
                self.backend.step(self._publish, self._aborted)
            elif self.stopping:
                break
            if self.place.is_leader:
                self.reporter.flush(self.link)
        if self.place.is_leader:
            log(
                f"replica {self.place.replica}: {self.backend.summary()}; {time.perf_counter() - start:.1f} s in the "
                "replica loop",
                everywhere=True,
            )
            self.link.send(("bye",))

    def _sync(self, news: News | None) -> News:
        if self.place.control_group is None:
            return news
        box = [news]
        dist.broadcast_object_list(box, src=self.place.leader, group=self.place.control_group)
        return box[0]

    def _collect(self, block: bool) -> News:
        """The leader: ask for as much work as the backend has room for, then take whatever rank 0 sent
        (waiting for it when the backend is idle)."""
        want = self.backend.room() - self.asked
        if want > 0 and not self.stopping:
            self.link.send(("want", want))
            self.asked += want
        news, self.held = self.held, News()
        # Told to stop and idle: nothing more is coming, so waiting would only delay the end.
        wait = block and not news.work and not self.stopping
        for message in self.link.receive(IDLE_BEAT_S if wait else 0):
            if message[0] == "work":
                news.work += message[1]
                self.asked -= len(message[1])
            elif message[0] == "abort":
                news.aborts += message[1]
            elif message[0] == "stop":
                news.stop = True
        return news

    def _publish(self, events: list[Event]) -> None:
        if self.place.is_leader:
            self.reporter.events(events)

    def _aborted(self) -> set[int]:
        """Mid-batch (a backend that cannot return between tokens): the aborts rank 0 sent, agreed by the replica;
        work and stop orders that came with them wait for the next iteration, and so do the aborts: they also end
        requests not in this batch (waiting for the next, or held here), which would otherwise run in full later."""
        aborts = None
        if self.place.is_leader:
            self.held = self._collect(block=False)
            aborts = self.held.aborts
            self.reporter.flush(self.link)
        return set(self._sync(News(aborts=aborts) if aborts is not None else None).aborts)
