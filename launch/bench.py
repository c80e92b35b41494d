"""Benchmarks of the paths users run, with the plain transformers recipe measured in the same run.

    python launch/bench.py --config configs/gpt-oss-20b.yaml --workload sharegpt --requests 1000 \
        --paths launcher server plain --concurrency 1 128 256 --out docs/bench/run.json \
        model.path=builtin:gpt-oss-20b model.load_format=dummy

--paths:
  launcher  the batch job (launch/generate.py) on the workload, every request at once;
  server    launch/serve.py with that many concurrent streaming clients (--concurrency: one server, each in turn,
            on the first --rounds x concurrency requests), Completions API;
  plain     the launcher with engine.mode=never (model.generate, batches of --plain-batch) on the first
            --plain-requests requests: the ratio's denominator;
  isolated  the engine in this process on --batch-sizes identical ~80-token prompts run to exactly --new-tokens
            (its speed without the job around it); isolated-plain: model.generate likewise.
Workloads (parallel/bench/workloads.py): sharegpt (log-normal lengths, means ~220 in / ~200 out), long (8,000-token
prompts, 128 out), fixed (--prompt-tokens / --new-tokens). Random weights (model.load_format=dummy) give real
speed and meaningless text: every figure written says so. Prints a table, writes JSON.

Decoding follows generation.temperature (and top_p, seed) on every path, greedy by default. An isolated row counts
the distinct tokens it made: where they collapse onto a few (NaN logits make every token the same one),
a batch's routes collapse onto a few experts too, a step reads fewer expert weights than real text makes it read,
and the figure overstates the engine. Sampling at generation.temperature=1 spreads random weights' tokens nearly
uniformly, and shows such a collapse plainly.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.bench.measure import machine, run_launcher, run_server
from parallel.bench.workloads import head, write_workload
from parallel.config import merge_config, parse_args_and_overrides
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.plain import Plain
from parallel.protocol.harmony import encoding, pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request

PROMPT = "Write a long story about topic number {}, with a title, three characters and a twist at the end."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["launcher", "plain"],
        choices=["launcher", "server", "plain", "isolated", "isolated-plain"],
    )
    parser.add_argument("--workload", default="sharegpt", choices=["sharegpt", "long", "fixed"])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[256])
    parser.add_argument(
        "--rounds", type=int, help="server: the first rounds x concurrency requests at each concurrency (default: all)"
    )
    parser.add_argument("--plain-requests", type=int, default=128)
    parser.add_argument("--plain-batch", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per job")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--workdir", type=Path, help="workload, outputs and the jobs' logs (default: a new temporary folder)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parse_args_and_overrides(parser)
    # A stop (`timeout`, Slurm's time limit) unwinds as Ctrl-C does, so the server a run started in a session of its
    # own is ended by its `with` block rather than left holding the GPUs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    enc = encoding()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workload = workdir / f"{args.workload}.jsonl"
    drawn = write_workload(
        workload, enc, args.workload, args.requests, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens
    )
    result = {
        "machine": machine(),
        "workload": {
            "kind": args.workload,
            "requests": args.requests,
            "mean_prompt_words": mean(p for p, _ in drawn),
            "mean_new_tokens": mean(n for _, n in drawn),
        },
        "weights": "random (model.load_format=dummy)" if "model.load_format=dummy" in args.overrides else "checkpoint",
        "overrides": args.overrides,
        "nproc": args.nproc,
        "runs": [],
        "decoding": decoding(merge_config(args.config, list(args.overrides)).generation),
    }
    for path in args.paths:
        for row in measure(path, args, workload, workdir):
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    if dist.is_initialized():  # the isolated paths' process group: torch warns at exit about one left alive
        dist.destroy_process_group()


def measure(path: str, args, workload: Path, workdir: Path) -> list[dict]:
    if path == "launcher":
        return [
            {
                "path": "launcher",
                **run_launcher(args.config, workload, workdir / "out.jsonl", args.nproc, args.overrides),
            }
        ]
    if path == "plain":
        subset = head(workload, args.plain_requests, workdir / "plain.jsonl")
        plain = ["engine.mode=never", f"generation.batch_size={args.plain_batch}", *args.overrides]
        return [{"path": "plain", **run_launcher(args.config, subset, workdir / "plain.out.jsonl", args.nproc, plain)}]
    if path == "server":
        figures = run_server(
            args.config, workload, args.nproc, args.concurrency, args.overrides, workdir / "server.log", args.rounds
        )
        return [{"path": "server", **f} for f in figures]
    return isolated(args, "plain" if path == "isolated-plain" else "engine")


@functools.cache
def loaded(config: str, overrides: tuple[str, ...]):
    """The job's config and the model, loaded once in this process (one GPU, the whole model)."""
    from parallel.distributed.mesh import build_mesh, init_distributed
    from parallel.loading.model import load_model, plan_model

    cfg = merge_config(config, list(overrides))
    path, shape, layout = plan_model(cfg)
    _, device = init_distributed(cfg.runtime.collective_timeout_s)
    return cfg, load_model(path, shape, cfg.model, layout, build_mesh(layout, device))


def isolated(args, name: str) -> list[dict]:
    """The engine or the plain path in this process, one GPU, on identical prompts run to exactly --new-tokens."""
    cfg, model = loaded(args.config, tuple(args.overrides))
    device = model.device
    enc = encoding()
    rows = []
    for batch in args.batch_sizes:
        prompts = [render_prompt(enc, parse_request({"prompt": PROMPT.format(i)}, 0), "medium") for i in range(batch)]
        gen = cfg.generation
        work = [
            Work(i, p, args.new_tokens, Sampling(gen.temperature, gen.top_p, gen.seed + i, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        make = {
            "plain": partial(Plain, model, batch, stop_tokens(enc), pad_token_id(enc)),
            "engine": partial(Engine, model, cfg.engine, stop_tokens(enc)),
        }[name]
        backend = make()
        complete(backend, [Work(-1 - i, w.prompt, 4, w.sampling) for i, w in enumerate(work)])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = complete(backend, work)
        seconds = time.perf_counter() - start
        tokens = sum(len(t) for t, _ in out.values())
        distinct = len({token for t, _ in out.values() for token in t})
        rows.append(
            {
                "path": f"isolated {name}",
                "batch": batch,
                "prompt_tokens": mean(len(p) for p in prompts),
                "output_tokens": tokens,
                "distinct_tokens": distinct,
                "seconds": round(seconds, 2),
                "output_tokens_per_s": round(tokens / seconds, 1),
                "ttft_mean_s": round(mean(e.queued_s + e.first_token_s for _, e in out.values()), 3),
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                if device.type == "cuda"
                else None,
                "backend": backend.describe(),
            }
        )
        backend.close()
        del backend
        gc.collect()  # the engine's cache and graphs sit in reference cycles: freed now, not when the next needs room
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def decoding(gen) -> str:
    return f"sampled, temperature {gen.temperature}, top_p {gen.top_p}" if gen.temperature > 0 else "greedy"


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 1) if values else 0.0


def table(result: dict) -> str:
    keys = [
        "path",
        "batch",
        "concurrency",
        "requests",
        "output_tokens_per_s",
        "distinct_tokens",
        "total_tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "itl_p50_s",
        "itl_p99_s",
        "peak_gpu_memory_gib",
        "client_cpu_max",
        "server_http_cpu",
        "server_process_cpu",
    ]
    used = [k for k in keys if any(k in r for r in result["runs"])]
    lines = [
        f"{result['machine']}, {result['weights']} weights, {result['decoding']} decoding, "
        f"workload {result['workload']}, "
        f"{' '.join(result['overrides'])}",
        "",
        "| " + " | ".join(used) + " |",
        "|" + "---|" * len(used),
    ]
    for r in result["runs"]:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in used) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(
            "stopped; every job it started is ended, and --out (where given) holds what was measured before",
            file=sys.stderr,
        )
        sys.exit(130)
