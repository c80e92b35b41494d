"""Scaling studies: throughput-latency fronts over concurrency x layout x engine options x model, each point a real
job (the launcher, or the server under that many streaming clients), with the plain transformers recipe as its
own curve.

    python launch/scaling.py run --config configs/gpt-oss-20b.yaml --out docs/scaling/my-run \
        --layouts 1 tp=2 dp=2 --paths server plain --concurrency 1 16 64 256 --plain-concurrency 1 16 \
        --variant bf16 --variant mxfp4:model.mxfp4=require \
        model.path=builtin:gpt-oss-20b model.load_format=dummy model.mxfp4=dequantize
    python launch/scaling.py submit ... --ranks-per-node 8      # the same sweep as Slurm job arrays, then the report
    python launch/scaling.py report --out DIR                   # the report again, from the points measured so far

`run` measures every point that has no result yet, on this machine, then writes the report; run it again after a
stop and only the missing points run. `submit` does the same through Slurm: one array task a job (slurm/scaling.sh),
one array per GPU count, then a merge job that writes the report once all tasks have ended. `task` is what an array
task runs. What a point is, how concurrency is set on each path, and the files: parallel/bench/scaling/.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from parallel.bench.scaling.jobs import prepare, run_job
from parallel.bench.scaling.report import write_report
from parallel.bench.scaling.slurm import submit
from parallel.bench.scaling.sweep import PATHS, Job, Points, Sweep, named_sets
from parallel.config import merge_config, parse_args_and_overrides
from parallel.log import log


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A stop (kill, Slurm's time limit) unwinds as Ctrl-C does, ending the job in hand with the sweep (a server
    # runs in a session of its own, which only its `with` block ends); a rerun measures its points again.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = parse_args_and_overrides(parser(), argv)
    out = Path(args.out)
    if args.command == "report":
        if not (out / "sweep.json").exists():
            log(f"ERROR: {out} holds no sweep (no sweep.json): --out names the folder of a run or submit")
            return 2
        return report(out)
    if args.command == "task":
        return task(out, args.index)
    try:
        sweep = sweep_of(args, argv)
        check_configs(sweep)
        prepare(sweep, out)
    except ValueError as e:
        log(f"ERROR: {e}")
        return 2
    if args.command == "submit":
        todo = [(i, job) for i, job in enumerate(sweep.jobs()) if Points(out).missing(job)]
        try:
            ids = submit(out, todo, args.ranks_per_node, not args.cpu, args.sbatch, args.wait)
        except (RuntimeError, ValueError) as e:
            log(f"ERROR: {e}")
            return 1
        log(f"{len(todo)} jobs submitted as array(s) {', '.join(ids[:-1]) or '(none)'}; the report is job {ids[-1]}")
        return 0
    return run(sweep, out, args.gpus)


def run(sweep: Sweep, out: Path, gpus: int | None) -> int:
    """Every job with points missing, here, one after another; a failed job is reported and the others go on."""
    points, failed = Points(out), []
    jobs = sweep.jobs()
    todo = [(job, points.missing(job)) for job in jobs]
    left = sum(len(missing) for _, missing in todo)
    log(f"{sum(len(j.concurrency) for j in jobs) - left} points already measured in {out}, {left} to measure")
    for job, missing in todo:
        if not missing:
            continue
        if gpus is not None and job.gpus > gpus:
            log(f"{job.name}: needs {job.gpus} GPUs, --gpus is {gpus}: skipped")
            continue
        if not measure(sweep, job, out, missing):
            failed.append(job.name)
    report(out)
    if failed:
        log(f"ERROR: {len(failed)} jobs failed ({', '.join(failed)}); run the same command again to retry them")
    return 1 if failed else 0


def task(out: Path, index: int) -> int:
    """A Slurm array task: the index-th job of the sweep, its missing points only."""
    sweep = Sweep.load(out / "sweep.json")
    job = sweep.jobs()[index]
    ranks = int(os.environ["SLURM_NNODES"]) * int(os.environ["NPROC_PER_NODE"])
    if ranks != job.gpus:
        log(f"ERROR: {job.name} needs {job.gpus} ranks, this allocation starts {ranks}")
        return 2
    return 0 if measure(sweep, job, out, Points(out).missing(job)) else 1


def measure(sweep: Sweep, job: Job, out: Path, concurrency: list[int]) -> bool:
    """Whether the job measured its points; why not, in the log (a launcher's ends the message, a server's stays
    in <out>/logs)."""
    log(f"{job.name}: concurrency {' '.join(map(str, concurrency))}")
    try:
        run_job(sweep, job, out, concurrency)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"ERROR: {job.name} failed: {e}")
        return False
    return True


def report(out: Path) -> int:
    for path in write_report(out):
        log(f"wrote {path}")
    return 0


def sweep_of(args: argparse.Namespace, argv: list[str]) -> Sweep:
    models = named_sets(args.model) or {Path(args.config).stem: []}
    variants = named_sets(args.variant) or {"engine": []}
    workload = {
        "kind": args.workload,
        "seed": args.seed,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }
    return Sweep(
        args.config,
        args.overrides,
        models,
        variants,
        args.layouts,
        args.paths,
        args.concurrency,
        args.plain_concurrency if "plain" in args.paths else [],
        workload,
        args.rounds,
        command=" ".join(["python", "launch/scaling.py", *argv]),
    )


def check_configs(sweep: Sweep) -> None:
    """Every job's config and overrides, as its launch will read them: a typo fails here, naming its key, instead
    of failing every job and being saved in sweep.json, where a corrected rerun is refused as another sweep."""
    for config, overrides in {(config, tuple(o)) for config, o in map(sweep.job_config, sweep.jobs())}:
        merge_config(config, overrides)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    for name in ("run", "submit"):
        p = commands.add_parser(name)
        p.add_argument("--config", required=True, help="the base config; a model may name another (config=FILE)")
        p.add_argument("--out", required=True, help="the sweep's folder: plan, workload, points, report")
        p.add_argument("--model", action="append", default=[], help="NAME:key=value,... (default: the config alone)")
        p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... engine or model options")
        p.add_argument("--layouts", nargs="+", default=["1"], help="1, tp=2, dp=2,tp=2, ...")
        p.add_argument("--paths", nargs="+", default=["server", "plain"], choices=PATHS)
        p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64, 256])
        p.add_argument("--plain-concurrency", nargs="+", type=int, default=[1, 64], help="the plain recipe's batches")
        p.add_argument("--workload", default="sharegpt", choices=["sharegpt", "long", "fixed"])
        p.add_argument("--prompt-tokens", type=int, default=1024, help="fixed workload")
        p.add_argument("--new-tokens", type=int, default=1024, help="fixed workload")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--rounds", type=int, default=4, help="requests a point: rounds x concurrency")
    commands.choices["run"].add_argument("--gpus", type=int, help="skip jobs of more GPUs than this")
    slurm = commands.choices["submit"]
    slurm.add_argument("--ranks-per-node", type=int, required=True, help="GPUs a node (processes on CPU nodes)")
    slurm.add_argument("--cpu", action="store_true", help="CPU nodes: ask for CPUs, not GPUs")
    slurm.add_argument(
        "--sbatch", action="append", default=[], help="an sbatch option for every job: --sbatch=--partition=gpu"
    )
    slurm.add_argument("--wait", action="store_true", help="return once the report is written")
    commands.add_parser("task").add_argument("--index", type=int, required=True)
    commands.add_parser("report")
    for name in ("task", "report"):
        commands.choices[name].add_argument("--out", required=True)
    return top


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("stopped; the same command measures the points left")
        sys.exit(130)
