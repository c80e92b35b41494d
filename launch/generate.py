"""Batch generation with gpt-oss: harmony prompts in, harmony-parsed answers out, on any parallel layout.

    torchrun --nproc_per_node=4 launch/generate.py --config configs/gpt-oss-120b.yaml \
        data.input=prompts.jsonl data.output=answers.jsonl parallel.tp=4

Reads top to bottom: config -> layout -> process group and mesh -> work plan (rank 0) -> model -> loop ->
metrics. Run it again with the same data.output to resume a stopped job.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.batch.coordinator import publish, serve_replica
from parallel.batch.output import OutputFile, check_paths, read_requests
from parallel.batch.planning import batch_runner, plan_work
from parallel.batch.writer import Totals, Writer
from parallel.config import ConfigError, load_config, to_yaml
from parallel.distributed.layout import LayoutError
from parallel.distributed.loading import load_model, plan_model
from parallel.distributed.runtime import exit_on_signals, join_job
from parallel.engine.choice import choose_generator
from parallel.log import error, log
from parallel.protocol.harmony import encoding, pad_token_id


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    # Like stderr: a record echoed with text UTF-8 cannot hold (an id with a lone surrogate) prints escaped,
    # instead of killing the writer.
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        cfg = load_config(argv, required=("data.input", "data.output"))
        # Everything that can be wrong with the job is found here, before a process group or a weight exists.
        check_paths(cfg.data.input, cfg.data.output)
        path, shape, layout = plan_model(cfg)
        enc = encoding()
    except (ConfigError, LayoutError, OSError, ValueError) as e:
        error(str(e))
        return 2

    place, watchdog, store = join_job(layout, cfg.runtime)

    writer = None
    if place.rank == 0:
        out = OutputFile(cfg.data.output)
        Path(f"{cfg.data.output}.config.yaml").write_text(to_yaml(cfg))
        requests = read_requests(cfg.data.input, cfg.data.shard, cfg.data.num_shards)
        batches, rejected = plan_work(requests, out, enc, cfg.generation, shape.max_position_embeddings)
        out.write(rejected)
        n_requests = sum(map(len, batches))
        log(f"{n_requests} requests to run in {len(batches)} batches, {len(rejected)} lines rejected, "
            f"{len(out.done) - len(rejected)} already in {cfg.data.output}")
        publish(store, batches)
    # Read at signal time: rank 0 before its writer exists has nothing in flight.
    exit_on_signals(lambda: writer.stop() if writer else f"rank {place.rank} stopping")

    try:
        model = load_model(path, shape, cfg.model, layout, place)
    except RuntimeError as e:  # e.g. model.mxfp4=require where only dequantizing is possible
        error(str(e))
        return 2
    gen_start = time.monotonic()
    if place.rank == 0:
        writer = Writer(out, len(batches), n_requests, cfg.runtime.collective_timeout_s, cfg.output.echo, cfg.runtime.progress)
        writer.start()
    generator = choose_generator(model, cfg.engine, layout, pad_token_id(enc), place.replica_group)
    serve_replica(place, store, batch_runner(generator, enc, cfg.generation, cfg.output.raw))
    store.set(f"peak_gib/{place.rank}", str(peak_memory_gib(place.device)))

    if writer:
        writer.finish()
        metrics = summarize(writer.totals, place.world_size, str(layout), time.monotonic() - start, time.monotonic() - gen_start)
        metrics["peak_gpu_memory_gib"] = max(float(store.get(f"peak_gib/{r}")) for r in range(place.world_size)) or None
        metrics["rejected_lines"] = len(rejected)
        Path(f"{cfg.data.output}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log(json.dumps(metrics))
    watchdog.stop()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


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
