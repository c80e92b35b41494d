"""Batch generation with gpt-oss: harmony prompts in, harmony-parsed answers out, on any parallel layout.

    torchrun --nproc_per_node=4 launch/generate.py --config configs/gpt-oss-120b.yaml \
        data.input=prompts.jsonl data.output=answers.jsonl parallel.tp=4

Reads top to bottom: config -> layout -> process group and mesh -> work plan (rank 0) -> model -> the replica
loop (rank 0 hands out requests, every replica generates, rank 0 writes the records) -> metrics. Run it again
with the same data.output to resume a stopped job; one job writes an output at a time (parallel/batch/lock.py).
"""

from __future__ import annotations

import json
import sys
import time

from parallel.batch.output import (
    OutputError,
    OutputFile,
    check_paths,
    read_requests,
    write_atomically,
)
from parallel.batch.planning import plan_work
from parallel.batch.reporter import RecordMaker
from parallel.batch.writer import Totals, Writer
from parallel.config import to_yaml
from parallel.distributed.runtime import exit_on_signals, join_job
from parallel.job import (
    finish_job,
    load_backend,
    open_links,
    peak_memory_gib,
    plan_run,
    stop_job,
)
from parallel.log import error, log
from parallel.replicas.dispatcher import Dispatcher
from parallel.replicas.loop import Replica


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    run = plan_run(
        argv, required=("data.input", "data.output"), check=lambda cfg: check_paths(cfg.data.input, cfg.data.output)
    )
    if run is None:
        return 2
    cfg = run.cfg
    place, watchdog, store = join_job(run.layout, cfg.runtime)
    enc = run.enc

    writer = None
    if place.rank == 0:
        try:
            # One job writes an output at a time: this takes <output>.lock, held until rank 0 exits, and refuses an
            # output that another job is writing.
            out = OutputFile(cfg.data.output)
            write_atomically(f"{cfg.data.output}.config.yaml", to_yaml(cfg))
            requests = read_requests(cfg.data.input, cfg.data.shard, cfg.data.num_shards)
            work, rejected = plan_work(requests, out, enc, cfg.generation, run.shape.max_position_embeddings)
            out.write(rejected)
        except OutputError as e:
            error(f"data.output: {e}")
            store.set("new_records", "refused")
        else:
            kept = len(out.done) - len(rejected)
            log(f"{len(work)} requests to run, {len(rejected)} lines rejected, {kept} already in {cfg.data.output}")
            store.set("new_records", str(len(work) + len(rejected)))
    new_records = store.get("new_records")
    # An output that another job is writing, or a full disk, stops every rank here (exit 2), before any model loads.
    if new_records == b"refused":
        stop_job(watchdog, 2)
    # A finished job run again stops here, before any model loads, and keeps the metrics of the run that did the work.
    if new_records == b"0":
        log(f"nothing to do: every line of {cfg.data.input} has its record in {cfg.data.output}")
        finish_job(watchdog)
        return 0
    if place.rank == 0:
        writer = Writer(out, len(work), cfg.output.echo, cfg.runtime.progress)
    # Read at signal time: rank 0 before its writer exists has nothing in flight.
    exit_on_signals(lambda: writer.stop() if writer else f"rank {place.rank} stopping")

    backend = load_backend(run, place)
    if backend is None:
        return 2
    hub, link = open_links(place, store, run.layout.dp)
    # Rank 0's hub waits for every replica to load and connect before any work goes out: a replica slow to start
    # counts as loading, not generation.
    gen_start = time.monotonic()
    if hub:
        dispatcher = Dispatcher(hub, run.layout.dp, writer.deliver)
        dispatcher.submit(work)
        dispatcher.close()
        dispatcher.start()
    Replica(place, backend, link, RecordMaker(enc, cfg.output.raw) if place.is_leader else None).run()
    store.set(f"peak_gib/{place.rank}", str(peak_memory_gib(place.device)))

    status = 0
    if writer:
        dispatcher.finished.wait()
        writer.close()
        metrics = summarize(
            writer.totals, place.world_size, str(run.layout), time.monotonic() - start, time.monotonic() - gen_start
        )
        metrics["peak_gpu_memory_gib"] = max(float(store.get(f"peak_gib/{r}")) for r in range(place.world_size)) or None
        metrics["rejected_lines"] = len(rejected)
        log(json.dumps(metrics))
        try:
            write_atomically(
                f"{cfg.data.output}.metrics.json",
                json.dumps(metrics, indent=2) + "\n",
                advice=f"every record is in {cfg.data.output}, and the metrics in the line above",
            )
        except OutputError as e:
            error(str(e))
            status = 1
    finish_job(watchdog, backend)
    return status


def summarize(totals: Totals, world_size: int, layout: str, wall_s: float, generation_s: float) -> dict:
    generated = totals.generated_tokens
    return {
        "requests": totals.requests,
        "errors": totals.errors,
        "prompt_tokens": totals.prompt_tokens,
        "generated_tokens": generated,
        "wall_s": round(wall_s, 3),
        "generation_s": round(generation_s, 3),
        "tokens_per_s": round(generated / generation_s, 2),
        "tokens_per_s_per_gpu": round(generated / generation_s / world_size, 2),
        "time_to_first_token_s": round(totals.first_token_s / totals.timed, 4) if totals.timed else None,
        "world_size": world_size,
        "layout": layout,
    }


if __name__ == "__main__":
    sys.exit(main())
