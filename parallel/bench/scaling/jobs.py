"""Running a sweep's jobs: the workload they share, each job through parallel/bench/measure.py (the real launcher, the
real server under its clients), and each point's figures into its result file as soon as they are known."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from parallel.bench.measure import machine, run_launcher, run_server
from parallel.bench.scaling.slurm import allocation_hosts
from parallel.bench.scaling.sweep import Job, Points, Sweep, concurrency_overrides, write_atomically
from parallel.bench.workloads import head, write_workload
from parallel.protocol.harmony import encoding


def prepare(sweep: Sweep, out: Path) -> None:
    """The sweep's plan (sweep.json) and its workload, once, before any job: every job, and every Slurm task,
    reads the same requests. Written again only when more lines are wanted: the seeded workload keeps its first
    lines as it grows, so points already measured keep their inputs."""
    out.mkdir(parents=True, exist_ok=True)
    sweep.save(out / "sweep.json")
    meta = out / "workload.json"
    if meta.exists() and json.loads(meta.read_text())["requests"] >= sweep.workload_size():
        return
    spec = dict(sweep.workload)
    kind, seed = spec.pop("kind"), spec.pop("seed")
    drawn = write_workload(out / "workload.jsonl", encoding(), kind, sweep.workload_size(), seed, **spec)
    write_atomically(
        meta,
        json.dumps(
            {
                "kind": kind,
                "requests": len(drawn),
                "mean_prompt_tokens": round(sum(p for p, _ in drawn) / len(drawn), 1),
                "mean_new_tokens": round(sum(n for _, n in drawn) / len(drawn), 1),
            },
            indent=2,
        )
        + "\n",
    )


def run_job(sweep: Sweep, job: Job, out: Path, concurrency: list[int]) -> None:
    """Measure the job's points at these concurrencies, writing each one's result as it comes. Its logs stay in
    <out>/logs (a launcher job's records go with its temporary folder, once measured); a job that fails raises
    with the end of its log."""
    points, here, logs = Points(out), machine(), out / "logs"
    logs.mkdir(exist_ok=True)
    config, overrides = sweep.job_config(job)
    workload = out / "workload.jsonl"
    if job.path == "server":
        log = logs / f"{job.name}.log"
        measured = run_server(config, workload, job.gpus, concurrency, overrides, log, sweep.rounds, allocation_hosts())
        for figures in measured:
            points.write(result(job, figures["concurrency"], figures, here))
        return
    for c in concurrency:
        with tempfile.TemporaryDirectory(prefix="scaling-") as work:
            share, output = (
                head(workload, sweep.requests(job, c), Path(work) / "input.jsonl"),
                Path(work) / "output.jsonl",
            )
            try:
                figures = run_launcher(config, share, output, job.gpus, [*overrides, *concurrency_overrides(job, c)])
            finally:
                shutil.move(f"{output}.log", logs / f"{job.point(c)}.log")
        points.write(result(job, c, figures, here))


def result(job: Job, concurrency: int, figures: dict, here: str) -> dict:
    """A point's result file: who it is, what measure.py measured, and the two figures the plots compare.
    Tokens/s per user: a server's streams measure it; a batch job's requests are all in flight together, so it is
    the job's output tokens/s shared by its requests in flight (the rate each decodes at while all run)."""
    if job.path == "server":
        per_user = figures["tokens_per_s_per_stream"]
    else:
        per_user = figures["output_tokens_per_s"] / min(concurrency, figures["requests"])
    return {
        **figures,  # first: measure.py's `layout` (the resolved degrees) gives way to the sweep's name for it
        "point": job.point(concurrency),
        "model": job.model,
        "variant": job.variant,
        "layout": job.layout,
        "path": job.path,
        "concurrency": concurrency,
        "gpus": job.gpus,
        "nodes": int(os.environ.get("SLURM_NNODES", "1")),
        "machine": here,
        "output_tokens_per_s_per_gpu": round(figures["output_tokens_per_s"] / job.gpus, 2),
        "tokens_per_s_per_user": round(per_user, 2),
        "measured": datetime.now().isoformat(timespec="seconds"),
    }
