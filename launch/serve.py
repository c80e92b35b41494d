"""An OpenAI-compatible server for gpt-oss on any parallel layout: Chat Completions, Responses, tools, streaming.

    torchrun --nproc_per_node=4 launch/serve.py --config configs/gpt-oss-120b.yaml parallel.tp=4

Reads top to bottom: config -> layout -> process group and mesh -> the API process started (rank 0: its HTTP
port bound, its dispatcher waiting for the replicas) -> model -> every replica's leader linked to the API process
-> the replica loop (the API process hands each request to a replica with room, every replica generates, tokens
stream back). SIGTERM drains: requests in flight finish, new ones are refused, then every rank exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from parallel.distributed.runtime import join_job
from parallel.job import finish_job, load_backend, plan_run
from parallel.log import error, log
from parallel.replicas.channel import connect
from parallel.replicas.loop import Replica
from parallel.replicas.streamer import TokenStreamer
from parallel.serve.api_process import ApiProcess, ApiProcessError


def main(argv: list[str] | None = None) -> int:
    run = plan_run(argv)
    if run is None:
        return 2
    cfg = run.cfg
    place, watchdog, store = join_job(run.layout, cfg.runtime)

    api = None
    if place.rank == 0:
        try:  # before loading: a port in use fails in a second, not after the weights
            api = ApiProcess(cfg, run.shape.max_position_embeddings, run.shape.vocab_size, run.layout.dp)
        except ApiProcessError as e:
            error(str(e))
            return 2
    drain_on_signals(api)

    backend = load_backend(run, place)
    if backend is None:
        return 2
    if api:
        api.link_replicas(store)
    link = connect(store, place.replica) if place.is_leader else None
    streamer = TokenStreamer(cfg.server.stream_interval, backend.stats) if place.is_leader else None
    Replica(place, backend, link, streamer).run()

    if api and api.wait():
        backend.close()  # no process-group teardown, but the graphs still go first (parallel/job.py's finish_job)
        return 1
    finish_job(watchdog, backend)
    return 0


def drain_on_signals(api: ApiProcess | None) -> None:
    """SIGTERM/SIGINT: rank 0 has its API process drain (a second signal, or one before the model is up, exits at
    once); the other ranks carry on until the API process ends their loop (torchrun signals every rank; only the
    API process knows what is in flight)."""
    draining = threading.Event()

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if api is None:
            return
        if draining.is_set() or not api.serving:
            error(f"received {name}: exiting now")
            api.stop_now()
            os._exit(128 + signum)
        draining.set()
        log(f"received {name}: draining (new requests refused, those in flight finish)")
        threading.Thread(target=api.drain, name="drain").start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
