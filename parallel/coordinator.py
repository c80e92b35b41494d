"""Rank 0 hands out batches on demand, gathers the replicas' records and is the only writer of the output.

All coordination goes through the job's c10d TCPStore (the one torchrun's rendezvous already runs), not
through collectives, so a slow replica holds no one back and a thread may talk to it on its own connection:
  batch/{k}   the k-th batch, published by rank 0 before any model loads;  `batches` = how many
  next        a counter each replica leader bumps to claim the next batch
  result/{k}  the records of batch k, then done/{j} = k for the j-th batch finished (`ndone` counts them)
  hb/{rank}   heartbeat counters: a rank whose counter stops is dead or hung, and the job ends naming it
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from tqdm import tqdm

from parallel.config import RuntimeConfig
from parallel.layout import Layout
from parallel.log import error
from parallel.mesh import Mesh, build_mesh, init_distributed
from parallel.records import OutputFile

HEARTBEAT_PERIOD_S = 1.0
POLL_S = 0.05
STOP_WAIT_S = 10.0


def join_job(layout: Layout, runtime: RuntimeConfig) -> tuple[Mesh, Watchdog, dist.Store]:
    """This rank in the job: the process group, its place on the mesh, its heartbeat watchdog (started) and a
    connection to the job's store."""
    _, device = init_distributed(runtime.collective_timeout_s)
    mesh = build_mesh(layout, device)
    watchdog = Watchdog(mesh, runtime.heartbeat_timeout_s)
    watchdog.start()
    return mesh, watchdog, open_store(runtime.collective_timeout_s)


def open_store(timeout_s: float) -> dist.Store:
    """A new client connection to the job's store, under a prefix of ours (one per thread that uses it)."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout_s)
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"gpt-oss-launch/{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}/{attempt}/", store)


class Watchdog(threading.Thread):
    """Beats this rank's heartbeat and watches others': rank 0 watches every rank, the others watch rank 0.

    A missed heartbeat or a lost store ends this process at once (exit 1); torchrun then stops the rest.
    """

    def __init__(self, mesh: Mesh, timeout_s: float):
        super().__init__(daemon=True, name="watchdog")
        self.rank, self.timeout_s = mesh.rank, timeout_s
        self.watched = range(mesh.world_size) if mesh.rank == 0 else [0]
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            store = open_store(self.timeout_s)
            last = {r: (-1, time.monotonic()) for r in self.watched}
            while not self.stopped.wait(HEARTBEAT_PERIOD_S):
                store.add(f"hb/{self.rank}", 1)
                now = time.monotonic()
                for r in self.watched:
                    count = store.add(f"hb/{r}", 0)
                    if count != last[r][0]:
                        last[r] = (count, now)
                    elif now - last[r][1] > self.timeout_s and not self.stopped.is_set():
                        fatal(f"rank {r} sent no heartbeat for {self.timeout_s:.0f} s: it died or hangs; ending the job")
        except Exception as e:  # the store lives with rank 0 / its torchrun agent: without it the job is over
            if not self.stopped.is_set():
                fatal(f"lost the job's store ({e}): rank 0 or its torchrun agent is gone; ending the job")

    def stop(self) -> None:
        self.stopped.set()


def fatal(msg: str) -> None:
    error(msg)
    os._exit(1)


def publish(store: dist.Store, batches: list[list[dict]]) -> None:
    for k, batch in enumerate(batches):
        store.set(f"batch/{k}", json.dumps(batch))
    store.set("batches", str(len(batches)))


def serve_replica(mesh: Mesh, store: dist.Store, run_batch: Callable[[list[dict], int], list[dict]]) -> None:
    """Claim batches until none are left. The leader claims and broadcasts; every rank of the replica runs the
    batch; the leader publishes the records `run_batch` returns."""
    n = int(store.get("batches"))
    while True:
        work = [None]
        if mesh.is_leader:
            k = store.add("next", 1) - 1
            work = [(k, json.loads(store.get(f"batch/{k}")))] if k < n else [None]
        if mesh.replica_group is not None:
            dist.broadcast_object_list(work, src=mesh.leader, group=mesh.replica_group)
        if work[0] is None:
            return
        k, batch = work[0]
        records = run_batch(batch, k)
        if mesh.is_leader:
            store.set(f"result/{k}", json.dumps(records))
            j = store.add("ndone", 1) - 1
            store.set(f"done/{j}", str(k))


@dataclass
class Totals:
    """What the metrics need of the records written, as running sums: a long job keeps no records in memory."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_s: float = 0.0  # summed over the records that carry timing
    timed: int = 0

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.requests += 1
            self.errors += r["error"] is not None
            self.prompt_tokens += r["usage"]["prompt_tokens"]
            self.generated_tokens += r["usage"]["completion_tokens"]
            if "timing" in r:
                self.first_token_s += r["timing"]["first_token_s"]
                self.timed += 1


class Writer(threading.Thread):
    """Rank 0's writer: appends each finished batch's records to the output as soon as it arrives."""

    def __init__(self, out: OutputFile, n_batches: int, n_requests: int, timeout_s: float, echo: bool, progress: bool):
        super().__init__(daemon=True, name="writer")
        self.out, self.n_batches, self.echo = out, n_batches, echo
        self.store = open_store(timeout_s)
        self.lock = threading.Lock()
        self.totals = Totals()
        self.batches_written = 0
        self.failure: BaseException | None = None
        self.start_time = time.monotonic()
        self.bar = tqdm(total=n_requests, unit="req", disable=not progress, dynamic_ncols=True)

    def run(self) -> None:
        try:
            while self.batches_written < self.n_batches:
                if not self.poll():
                    time.sleep(POLL_S)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which reports it
            self.failure = e

    def poll(self) -> bool:
        """Write every batch finished since the last poll; False when there was none."""
        with self.lock:
            return self._collect()

    def _collect(self) -> bool:
        before = self.batches_written
        finished = self.store.add("ndone", 0)
        # A leader bumps `ndone` and then sets done/{j}: check before reading, so that a leader killed between the
        # two can never block the writer (that batch simply has no record and runs again on resume).
        while self.batches_written < finished and self.store.check([f"done/{self.batches_written}"]):
            k = self.store.get(f"done/{self.batches_written}").decode()
            self.write(json.loads(self.store.get(f"result/{k}")))
            self.store.delete_key(f"result/{k}")
            self.batches_written += 1
        return self.batches_written > before

    def write(self, records: list[dict]) -> None:
        self.out.write(records)
        self.totals.add(records)
        self.bar.update(len(records))
        self.bar.set_postfix_str(f"{self.totals.generated_tokens / (time.monotonic() - self.start_time):.1f} tok/s")
        if self.echo:
            for r in records:
                answer = r["final"] or json.dumps(r["tool_calls"]) if r["error"] is None else f"{r['error']} {r.get('raw', '')!r:.80}"
                tqdm.write(f"[{r['id']}] {r['finish_reason']}: {answer}")

    def stop(self) -> str:
        """For a signal handler: keep what the replicas already finished, then let no write begin (the lock is
        never released). Bounded: a writer stuck on a dying store only costs the records it was fetching."""
        if self.lock.acquire(timeout=STOP_WAIT_S):
            try:
                self._collect()
            except Exception:  # noqa: BLE001 - the store may be gone with the job; what is written stays
                pass
        return f"{len(self.out.done)} records are in {self.out.path}; run again with the same data.output to resume"

    def finish(self) -> None:
        self.join()
        self.bar.close()
        if self.failure is not None:
            raise RuntimeError(f"writing {self.out.path} failed: {self.failure}") from self.failure


def exit_on_signals(on_exit: Callable[[], str]) -> None:
    """SIGTERM (Slurm preemption and time limits, torchrun stopping workers) and SIGINT: say what was kept, exit
    non-zero. `on_exit` finishes any write in progress and returns the message."""

    def handler(signum, frame):
        error(f"received {signal.Signals(signum).name}: {on_exit()}")
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
