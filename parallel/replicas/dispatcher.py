"""Rank 0's dispatcher: hands requests to replicas as they have room, and routes what they send back.

Leaders ask for work ("want", n) whenever their backend has room; the dispatcher gives each what is pending,
round-robin across the replicas that asked, and parks the rest of their demand until more arrives, so a slow
replica holds no one back and a burst of requests is spread. What comes back ("events" for a server's streams,
"records" for a batch job's output, each carrying request ids) goes to `deliver`; a request stays owned by its
replica until its last event or its record arrives, so an abort finds it. `close()` says no more work will
come: once nothing is pending, every replica is told to stop when idle.
"""

from __future__ import annotations

import threading
from collections import deque

from parallel.engine.interface import Work
from parallel.log import error
from parallel.replicas.channel import Hub


class Dispatcher(threading.Thread):
    def __init__(self, hub: Hub, replicas: int, deliver, on_gone=None):
        super().__init__(daemon=True, name="dispatcher")
        self.hub, self.replicas, self.deliver, self.on_gone = hub, replicas, deliver, on_gone
        self.lock = threading.Lock()
        self.pending: deque[Work] = deque()
        self.demand = [0] * replicas
        self.owner: dict[int, int] = {}
        self.replica_stats: dict[int, dict[str, int]] = {}  # each replica's backend's latest counts (a server's)
        self.closed = False
        self.stopped: set[int] = set()  # replicas that said goodbye
        self.asked: set[int] = set()  # replicas that have asked for work at least once
        self.told_to_stop: set[int] = set()
        # What a replica sent after its goodbye belongs to the next dispatcher on this hub (the LLM runs one a call,
        # and a replica may start the next call before this one has heard every goodbye): handed back at the end.
        self.next_round: list = []
        self.finished = threading.Event()  # every replica has said goodbye

    # -- called from other threads --------------------------------------------------------------------------

    def submit(self, work: list[Work]) -> None:
        with self.lock:
            self.pending.extend(work)
            self._assign()

    def abort(self, rid: int) -> bool:
        """End a request wherever it is; False if it was still pending (then it is simply dropped)."""
        with self.lock:
            for w in self.pending:
                if w.rid == rid:
                    self.pending.remove(w)
                    return False
            replica = self.owner.get(rid)
        if replica is not None:
            self.hub.send(replica, ("abort", [rid]))
        return True

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._assign()

    def status(self) -> dict:
        with self.lock:
            return {
                "waiting": len(self.pending),
                "running": len(self.owner),
                "replicas_asking": sum(d > 0 for d in self.demand),
            }

    def per_replica(self) -> tuple[dict[int, int], dict[int, dict[str, int]]]:
        """The requests each replica holds, and each one's latest counts."""
        with self.lock:
            held = {replica: 0 for replica in range(self.replicas)}
            for replica in self.owner.values():
                held[replica] += 1
            return held, dict(self.replica_stats)

    # -- the thread -----------------------------------------------------------------------------------------

    def run(self) -> None:
        while len(self.stopped) < self.replicas or not self.closed:
            replica, message = self.hub.inbox.get()
            kind = message[0]
            if replica in self.stopped and kind != "gone":
                self.next_round.append((replica, message))
            elif kind == "want":
                with self.lock:
                    self.demand[replica] += message[1]
                    self.asked.add(replica)
                    self._assign()
            elif kind in ("events", "records"):
                with self.lock:
                    for rid in message[2]:
                        self.owner.pop(rid, None)
                    if len(message) > 3:  # a server's replica: its backend's counts
                        self.replica_stats[replica] = message[3]
                self.deliver(kind, message[1])
            elif kind == "bye":
                self.stopped.add(replica)
            elif kind == "gone" and replica not in self.stopped:
                error(f"replica {replica}'s leader is gone")
                with self.lock:
                    self.stopped.add(replica)
                    self._assign()
                if self.on_gone:
                    self.on_gone(replica)
        for item in self.next_round:
            self.hub.inbox.put(item)
        self.finished.set()

    def _assign(self) -> None:
        """Pending work to the replicas that asked, one request at a time round-robin (lock held). Nothing goes
        out before every live replica has asked once: each asks for room to refill all its slots twice over, so
        the first to ask would otherwise take a whole batch job's input."""
        ready = self.asked >= set(range(self.replicas)) - self.stopped
        batches: dict[int, list[Work]] = {}
        while ready and self.pending and any(self.demand):
            for replica in range(self.replicas):
                if self.demand[replica] and self.pending:
                    work = self.pending.popleft()
                    self.demand[replica] -= 1
                    self.owner[work.rid] = replica
                    batches.setdefault(replica, []).append(work)
        for replica, work in batches.items():
            self.hub.send(replica, ("work", work))
        if self.closed and not self.pending:
            for replica in set(range(self.replicas)) - self.told_to_stop:
                self.told_to_stop.add(replica)
                self.hub.send(replica, ("stop",))
