"""Serving: rank 0 gathers concurrent API requests into batches; replicas run them and stream each step back.

Like the batch launcher's coordinator, all of it goes through the job's c10d store, under serve/:
  next           each replica leader bumps it to claim the next batch number, then waits for that batch
  batch/{k}      batch k (prompts, limits, sampling), or {"stop": true}: the replica that claims it ends
  step/{k}/{i}   the i-th step of batch k: [row, token] pairs of the rows that made one; {"end": true} last
  cancel/{k}     rows of batch k whose clients went away, appended as "row,"; ncancel/{k} counts them
Rank 0 publishes a batch only when a replica is free, so requests that arrive while every replica is busy
wait and then run together. With the engine, a replica is never full: a batch published while it runs joins
the engine's rows at once (continuous batching across requests), so rank 0 publishes whatever waits.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

from openai_harmony import HarmonyEncoding

from parallel.distributed.runtime import open_store
from parallel.protocol.harmony import stop_tokens

# A leader with no batch to run tells its replica so this often: a quiet server is not a hung collective.
IDLE_BEAT_S = 5.0
POLL_S = 0.002
# After the first request of a batch arrives, wait this long for others that arrive with it.
GATHER_S = 0.01


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    ignore_eos: bool  # run to max_tokens whatever the model says (benchmarks)


@dataclass(eq=False)
class Job:
    """One API request on its way through a batch. `events` gets each new token (an int), then the finish
    reason (a str: stop, tool_call, length, cancelled, or "error: ..." when the batch failed)."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    events: queue.Queue = field(default_factory=queue.Queue)
    batch: int | None = None
    row: int = 0
    cancelled: bool = False


class Batcher(threading.Thread):
    """Rank 0: forms batches of waiting jobs (same sampling, up to batch_size) and streams their tokens back."""

    def __init__(self, enc: HarmonyEncoding, replicas: int, batch_size: int, timeout_s: float):
        super().__init__(daemon=True, name="batcher")
        self.stop_reasons = stop_tokens(enc)
        self.replicas, self.batch_size, self.timeout_s = replicas, batch_size, timeout_s
        self.store = open_store(timeout_s)
        self.store_lock = threading.Lock()  # handler threads cancel through the same connection
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.in_flight = 0
        self.next_batch = 0
        self.stopping = False
        self.joins = False  # set when the replicas run the engine, which takes new batches while it runs
        self.stats = {"batches": 0, "largest_batch": 0, "requests": 0}

    def submit(self, job: Job) -> None:
        with self.cond:
            self.waiting.append(job)
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, else end its row at the replica's next step."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                job.events.put("cancelled")
                return
        if job.batch is not None:
            with self.store_lock:
                self.store.append(f"serve/cancel/{job.batch}", f"{job.row},")
                self.store.add(f"serve/ncancel/{job.batch}", 1)

    def status(self) -> dict:
        with self.cond:
            return {"waiting": len(self.waiting), "running_batches": self.in_flight, **self.stats}

    def run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or (self.waiting and (self.joins or self.in_flight < self.replicas)))
                if self.stopping:
                    return
                # Requests sent together (a client's concurrent calls) should share the batch.
                self.cond.wait_for(lambda: len(self.waiting) >= self.batch_size, timeout=GATHER_S)
                jobs = self._take()
                k, self.next_batch = self.next_batch, self.next_batch + 1
                self.in_flight += 1
                self.stats["batches"] += 1
                self.stats["requests"] += len(jobs)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
                for row, job in enumerate(jobs):
                    job.batch, job.row = k, row
            batch = {
                "prompts": [j.prompt for j in jobs],
                "max_tokens": [j.max_tokens for j in jobs],
                "sampling": jobs[0].sampling.__dict__,
            }
            with self.store_lock:
                self.store.set(f"serve/batch/{k}", json.dumps(batch))
            threading.Thread(target=self._stream, args=(k, jobs), daemon=True, name=f"batch-{k}").start()

    def _take(self) -> list[Job]:
        """The oldest job and the next ones that sample the same way, in arrival order."""
        kind = self.waiting[0].sampling
        jobs = [j for j in self.waiting if j.sampling == kind][: self.batch_size]
        for j in jobs:
            self.waiting.remove(j)
        return jobs

    def _stream(self, k: int, jobs: list[Job]) -> None:
        """Hands each row's tokens to its job as the steps arrive; a row ends at a stop token or its limit."""
        store = open_store(self.timeout_s)
        counts = [0] * len(jobs)
        live = set(range(len(jobs)))
        for i in itertools.count():
            step = json.loads(store.get(f"serve/step/{k}/{i}"))
            store.delete_key(f"serve/step/{k}/{i}")
            if "end" in step:
                break
            for row, token in step["tokens"]:
                if row not in live:
                    continue
                job = jobs[row]
                reason = "cancelled" if job.cancelled else None
                if reason is None:
                    job.events.put(token)
                    counts[row] += 1
                    if not job.sampling.ignore_eos and token in self.stop_reasons:
                        reason = self.stop_reasons[token]
                    elif counts[row] >= job.max_tokens:
                        reason = "length"
                if reason:
                    job.events.put(reason)
                    live.discard(row)
        for row in live:  # only when the batch failed: every row that finished was handed its reason
            jobs[row].events.put(f"error: {step.get('error', 'the batch ended early')}")
        for key in (f"serve/batch/{k}", f"serve/cancel/{k}", f"serve/ncancel/{k}"):
            store.delete_key(key)
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def stop(self) -> None:
        """Ends every replica: each claims one of the next `replicas` batch numbers, and gets a stop there."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            first = self.next_batch
        with self.store_lock:
            for k in range(first, first + self.replicas):
                self.store.set(f"serve/batch/{k}", json.dumps({"stop": True}))
