"""A rank's membership in the job: process group and mesh, the job's c10d store, heartbeats and signals.

The job's c10d TCPStore (the one torchrun's rendezvous already runs) carries the heartbeats: hb/{rank} is a
counter each rank bumps; a rank whose counter stops is dead or hung, and the job ends naming it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from parallel.config import RuntimeConfig
from parallel.distributed.layout import Layout
from parallel.distributed.mesh import Placement, build_mesh, init_distributed
from parallel.log import error

HEARTBEAT_PERIOD_S = 1.0


def join_job(layout: Layout, runtime: RuntimeConfig) -> tuple[Placement, Watchdog, dist.Store]:
    """This rank in the job: the process group, its place on the mesh, its heartbeat watchdog (started) and a
    connection to the job's store."""
    _, device = init_distributed(runtime.collective_timeout_s)
    place = build_mesh(layout, device)
    watchdog = Watchdog(place, runtime.heartbeat_timeout_s)
    watchdog.start()
    return place, watchdog, open_store(runtime.collective_timeout_s)


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

    def __init__(self, place: Placement, timeout_s: float):
        super().__init__(daemon=True, name="watchdog")
        self.rank, self.timeout_s = place.rank, timeout_s
        self.watched = range(place.world_size) if place.rank == 0 else [0]
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
                        fatal(
                            f"rank {r} sent no heartbeat for {self.timeout_s:.0f} s: it died or hangs; ending the job"
                        )
        except Exception as e:  # the store lives with rank 0 / its torchrun agent: without it the job is over
            if not self.stopped.is_set():
                fatal(f"lost the job's store ({e}): rank 0 or its torchrun agent is gone; ending the job")

    def stop(self) -> None:
        self.stopped.set()


def fatal(msg: str) -> None:
    error(msg)
    os._exit(1)


def exit_on_signals(on_exit: Callable[[], str]) -> None:
    """SIGTERM (Slurm preemption and time limits, torchrun stopping workers) and SIGINT: say what was kept, exit
    non-zero. `on_exit` finishes any write in progress and returns the message."""

    def handler(signum, frame):
        error(f"received {signal.Signals(signum).name}: {on_exit()}")
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
