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
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from openai_harmony import HarmonyEncoding

from parallel.config import GenerationConfig
from parallel.coordinator import open_store
from parallel.engine import Engine
from parallel.generation import Plain
from parallel.harmony import stop_tokens
from parallel.log import error
from parallel.mesh import Mesh

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


def serve_batches(mesh: Mesh, store: dist.Store, generator: Engine | Plain, enc: HarmonyEncoding, gen: GenerationConfig) -> None:
    """Every rank: run the batches this replica claims until it claims a stop. With the engine, batches published
    while one runs join it (continuous batching across requests); one it claims but cannot join comes back as
    `held` and runs next."""
    claimed = held = None
    while True:
        work = [None]
        if mesh.is_leader:
            if held is None and claimed is None:
                claimed = store.add("serve/next", 1) - 1
            if held is not None:
                work, held = [held], None
            elif _appears(store, f"serve/batch/{claimed}", IDLE_BEAT_S):
                work, claimed = [(claimed, json.loads(store.get(f"serve/batch/{claimed}")))], None
            else:  # nothing yet: say so, so that the replica's next collective is not late
                work = ["idle"]
        if mesh.replica_group is not None:
            dist.broadcast_object_list(work, src=mesh.leader, group=mesh.replica_group)
        if work[0] == "idle":
            continue
        k, batch = work[0]
        if batch.get("stop"):
            return
        run = _Run(mesh, store, generator, enc, gen, k, batch, claimed)
        run.go()
        claimed, held = run.claimed, run.held


def _appears(store: dist.Store, key: str, within_s: float) -> bool:
    """Polls rather than store.wait, whose every timeout c10d logs as a warning."""
    deadline = time.monotonic() + within_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


class _Run:
    """One generate call on a replica: batch k, plus (engine only) the batches of the same sampling that are
    published while it runs. Engine rows are numbered across the joined batches; `rows` maps them back."""

    def __init__(self, mesh: Mesh, store: dist.Store, generator: Engine | Plain, enc: HarmonyEncoding,
                 gen: GenerationConfig, k: int, batch: dict, claimed: int | None):
        self.mesh, self.store, self.generator, self.enc, self.gen = mesh, store, generator, enc, gen
        self.k, self.batch, self.sampling = k, batch, Sampling(**batch["sampling"])
        self.claimed, self.held = claimed, None  # the leader's claim on the next batch, and one it could not join
        self.rows: list[tuple[int, int]] = []  # run row -> (batch, row in it)
        self.steps: dict[int, itertools.count] = {}
        self.cancels_seen: dict[int, int] = {}
        self.first_row: dict[int, int] = {}
        self.cancelled: list[bool] = []

    def _add(self, k: int, batch: dict) -> list[tuple[list[int], int]]:
        self.first_row[k], self.steps[k], self.cancels_seen[k] = len(self.rows), itertools.count(), 0
        self.rows += [(k, r) for r in range(len(batch["prompts"]))]
        self.cancelled += [False] * len(batch["prompts"])
        return list(zip(batch["prompts"], batch["max_tokens"]))

    def go(self) -> None:
        rows = self._add(self.k, self.batch)
        prompts, limits = [p for p, _ in rows], [n for _, n in rows]
        gen = replace(self.gen, temperature=self.sampling.temperature, top_p=self.sampling.top_p)
        hooks = dict(stop={} if self.sampling.ignore_eos else stop_tokens(self.enc), seed=self.gen.seed + self.k,
                     on_step=self.on_step if self.mesh.is_leader else None, cancelled=self.check_cancelled)
        if self.generator.joins:
            hooks["incoming"] = self.incoming
        end = {"end": True}
        try:
            self.generator.generate(prompts, limits, gen, **hooks)
        except torch.OutOfMemoryError as e:  # these requests fail; the server keeps serving
            error(f"batches {sorted(self.steps)} failed: {e}")
            end["error"] = f"out of memory: {e}"
            torch.cuda.empty_cache()
        if self.mesh.is_leader:
            for k, steps in self.steps.items():
                self.store.set(f"serve/step/{k}/{next(steps)}", json.dumps(end))

    def on_step(self, pairs: list[tuple[int, int]]) -> None:
        by_batch: dict[int, list] = {}
        for row, token in pairs:
            k, r = self.rows[row]
            by_batch.setdefault(k, []).append((r, token))
        for k, tokens in by_batch.items():
            self.store.set(f"serve/step/{k}/{next(self.steps[k])}", json.dumps({"tokens": tokens}))

    def incoming(self) -> list[tuple[list[int], int]]:
        """A batch published since the last step joins if it samples the same way; any other is held for later."""
        new = [None]
        if self.mesh.is_leader and self.held is None:
            if self.claimed is None:
                self.claimed = self.store.add("serve/next", 1) - 1
            if self.store.check([f"serve/batch/{self.claimed}"]):
                batch = json.loads(self.store.get(f"serve/batch/{self.claimed}"))
                if batch.get("stop") or Sampling(**batch["sampling"]) != self.sampling:
                    self.held = (self.claimed, batch)
                else:
                    new = [(self.claimed, batch)]
                self.claimed = None
        if self.mesh.replica_group is not None:
            dist.broadcast_object_list(new, src=self.mesh.leader, group=self.mesh.replica_group)
        return self._add(*new[0]) if new[0] else []

    def check_cancelled(self) -> list[bool]:
        if self.mesh.is_leader:
            for k, seen in self.cancels_seen.items():
                if self.store.add(f"serve/ncancel/{k}", 0) != seen:
                    rows = self.store.get(f"serve/cancel/{k}").decode().rstrip(",").split(",")
                    self.cancels_seen[k] = len(rows)
                    for r in rows:
                        self.cancelled[self.first_row[k] + int(r)] = True
        if self.mesh.replica_group is None:
            return self.cancelled
        mask = torch.tensor(self.cancelled, device=self.generator.device)
        dist.broadcast(mask, src=self.mesh.leader, group=self.mesh.replica_group)
        return mask.tolist()
