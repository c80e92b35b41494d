"""An OpenAI-compatible server for gpt-oss on any parallel layout: Chat Completions, Responses, tools, streaming.

    torchrun --nproc_per_node=4 launch/serve.py --config configs/gpt-oss-120b.yaml parallel.tp=4

Reads top to bottom: config -> layout -> process group and mesh -> HTTP server bound (rank 0) -> model -> the
replica loop (rank 0 hands each request to a replica with room, every replica generates, tokens stream back).
SIGTERM drains: requests in flight finish, new ones are refused, then every rank exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from parallel.distributed.replica import Replica
from parallel.distributed.runtime import join_job
from parallel.job import finish_job, load_backend, open_links, plan_run
from parallel.log import error, log
from parallel.serve.batcher import Batcher
from parallel.serve.http import Server
from parallel.serve.replica import TokenStreamer


def main(argv: list[str] | None = None) -> int:
    run = plan_run(argv)
    if run is None:
        return 2
    cfg = run.cfg
    place, watchdog, store = join_job(run.layout, cfg.runtime)

    server = None
    if place.rank == 0:
        try:  # bind before loading: a port in use fails in a second, not after the weights
            server = Server(cfg, run.enc, run.shape.max_position_embeddings, run.shape.vocab_size)
        except OSError as e:
            error(f"cannot listen on {cfg.server.host}:{cfg.server.port}: {e}")
            return 2
        except ValueError as e:
            error(str(e))
            return 2
    drain_on_signals(server)

    backend = load_backend(run, place)
    if backend is None:
        return 2
    hub, link = open_links(place, store, run.layout.dp)
    if hub:
        batcher = Batcher(hub, run.layout.dp)
        batcher.dispatcher.start()
        server.start(batcher)
    Replica(place, backend, link, TokenStreamer(cfg.server.stream_interval) if place.is_leader else None).run()

    if server:
        batcher.dispatcher.finished.wait()
        log(f"served {batcher.stats['requests']} requests")
    finish_job(watchdog)
    return 0


def drain_on_signals(server: Server | None) -> None:
    """SIGTERM/SIGINT: rank 0 drains its server (a second signal exits at once); the other ranks carry on until
    rank 0 ends their loop (torchrun signals every rank; only rank 0 knows what is in flight)."""
    draining = threading.Event()

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if server is None:
            return
        if draining.is_set() or not server.started:
            error(f"received {name}: exiting now")
            os._exit(128 + signum)
        draining.set()
        log(f"received {name}: draining (new requests refused, those in flight finish)")
        threading.Thread(target=server.drain, name="drain").start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
