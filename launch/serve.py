"""An OpenAI-compatible server for gpt-oss on any parallel layout: Chat Completions, Responses, tools, streaming.

    torchrun --nproc_per_node=4 launch/serve.py --config configs/gpt-oss-120b.yaml parallel.tp=4

Reads top to bottom: config -> layout -> process group and mesh -> model -> HTTP server (rank 0) -> the
replicas' batch loop. Rank 0 serves HTTP and batches concurrent requests; every replica runs the batches
it claims. SIGTERM drains: requests in flight finish, new ones are refused, then every rank exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch.distributed as dist

from parallel.config import ConfigError, load_config
from parallel.distributed.layout import LayoutError
from parallel.distributed.loading import load_model, plan_model
from parallel.distributed.runtime import join_job
from parallel.engine.choice import choose_generator
from parallel.log import error, log
from parallel.protocol.harmony import encoding, pad_token_id
from parallel.serve.batcher import Batcher
from parallel.serve.http import Server
from parallel.serve.replica import serve_batches


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        path, shape, layout = plan_model(cfg)
    except (ConfigError, LayoutError, FileNotFoundError, ValueError) as e:
        error(str(e))
        return 2

    place, watchdog, store = join_job(layout, cfg.runtime)
    enc = encoding()

    server = None
    if place.rank == 0:
        batcher = Batcher(enc, layout.dp, cfg.generation.batch_size, cfg.runtime.collective_timeout_s)
        try:  # bind before loading: a port in use fails in a second, not after the weights
            server = Server(cfg, enc, batcher, shape.max_position_embeddings)
        except OSError as e:
            error(f"cannot listen on {cfg.server.host}:{cfg.server.port}: {e}")
            return 2
    drain_on_signals(server)

    try:
        model = load_model(path, shape, cfg.model, layout, place)
    except RuntimeError as e:  # e.g. model.mxfp4=require where only dequantizing is possible
        error(str(e))
        return 2
    generator = choose_generator(model, cfg.engine, layout, pad_token_id(enc), place.replica_group)
    if server:
        batcher.joins = generator.joins
        batcher.start()
        server.start()
    serve_batches(place, store, generator, enc, cfg.generation)

    if server:
        log(f"served {batcher.status()['requests']} requests in {batcher.status()['batches']} batches")
    watchdog.stop()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def drain_on_signals(server: Server | None) -> None:
    """SIGTERM/SIGINT: rank 0 drains its server (a second signal exits at once); the other ranks carry on until
    rank 0 ends their batch loop (torchrun signals every rank; only rank 0 knows what is in flight)."""
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
