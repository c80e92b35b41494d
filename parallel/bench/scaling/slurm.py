"""A sweep as Slurm job arrays: one task a job (a launcher or plain point, or a server over its concurrencies),
then a merge job that draws the report once every task has ended, whatever became of them.

Slurm gives every task of an array the same resources, so the jobs go in one array per GPU count, each task
allocated the nodes its layout needs (`ranks_per_node` a node: GPUs on GPU nodes, processes on CPU ones). Array
task i runs job i of <out>/sweep.json (slurm/scaling.sh -> `launch/scaling.py task`), so the array's indices are
the jobs' own and a resubmitted sweep names only the jobs still missing points.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from parallel.bench.scaling.sweep import Job

SCRIPT = Path(__file__).resolve().parents[3] / "slurm" / "scaling.sh"


def placement(gpus: int, ranks_per_node: int) -> tuple[int, int]:
    """(nodes, ranks on each) of a job of `gpus` ranks."""
    if gpus <= ranks_per_node:
        return 1, gpus
    if gpus % ranks_per_node:
        raise ValueError(f"a job of {gpus} ranks does not fill nodes of {ranks_per_node}")
    return gpus // ranks_per_node, ranks_per_node


def submit(
    out: Path, todo: list[tuple[int, Job]], ranks_per_node: int, gpu: bool, sbatch_args: list[str], wait: bool
) -> list[str]:
    """Submit the arrays of the (index, job) pairs to do, then the merge; the job ids, the merge's last. With
    `wait`, return once the merge has ended."""
    sizes: dict[int, list[int]] = {}
    for index, job in todo:
        sizes.setdefault(job.gpus, []).append(index)
    ids = []
    for gpus, indices in sorted(sizes.items()):
        nodes, per_node = placement(gpus, ranks_per_node)
        resources = f"--gpus-per-node={per_node}" if gpu else f"--cpus-per-task={per_node}"
        ids.append(
            sbatch(
                [f"--array={','.join(map(str, indices))}", f"--nodes={nodes}", resources, *sbatch_args],
                out,
                NPROC_PER_NODE=str(per_node),
            )
        )
    after = [f"--dependency=afterany:{':'.join(ids)}"] if ids else []
    return [*ids, sbatch([*after, "--nodes=1", *sbatch_args, *(["--wait"] if wait else [])], out, "report")]


def sbatch(options: list[str], out: Path, *script_args: str, **env: str) -> str:
    """Submit slurm/scaling.sh for the sweep in `out`; its job id."""
    cmd = ["sbatch", "--parsable", *options, str(SCRIPT), *script_args]
    run = subprocess.run(cmd, env={**os.environ, "SWEEP": str(out.resolve()), **env}, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode}: {run.stderr.strip()}")
    return run.stdout.strip().split(";")[0]


def allocation_hosts() -> list[str] | None:
    """The nodes of this task's allocation when it has several (where a server's rank 0 may be), else None."""
    if int(os.environ.get("SLURM_NNODES", "1")) < 2:
        return None
    listing = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    )
    return listing.stdout.split()
