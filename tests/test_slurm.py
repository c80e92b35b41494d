"""slurm/*.sh against a real Slurm: two nodes, each in its own network namespace (tests/slurm/cluster.sh)."""

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import ROOT, read_records, write_jsonl
from tests.test_scaling import TINY_SWEEP, assert_report

CLUSTER = str(ROOT / "tests" / "slurm" / "cluster.sh")
PROMPTS = [{"id": f"s{i}", "prompt": f"Tell me about the number {i}."} for i in range(6)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Slurm tests: as root, with Debian's slurm-wlm and munge installed")
        pytest.skip("needs root and Debian's slurm-wlm and munge (.ci/run installs them)")
    path = tmp_path_factory.mktemp("slurm")
    subprocess.run([CLUSTER, "up", str(path)], check=True, timeout=120)
    try:
        yield path
    finally:  # daemons and namespaces go, pass or fail
        subprocess.run([CLUSTER, "down", str(path)], timeout=60)


def slurm(cluster, *cmd, timeout=60, **env):
    """A Slurm command run from node n1, in the repository, with extra environment for the job."""
    return subprocess.run(
        [CLUSTER, "run", str(cluster), *cmd],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sbatch(cluster, *args, wait=True, timeout=240, **env):
    # `timeout` around --wait: a broken step launch would otherwise hang until the job's time limit.
    mode = ["--wait"] if wait else ["--parsable"]
    run = slurm(
        cluster,
        "timeout",
        str(timeout),
        "sbatch",
        *mode,
        "--time=10",
        f"--output={cluster}/%x-%A_%a.out",
        *args,
        timeout=timeout + 30,
        **env,
    )
    return run


def job_logs(cluster, tail: int | None = 4000) -> str:
    return "\n".join(p.read_text()[-tail if tail else 0 :] for p in sorted(cluster.glob("*.out")))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("in") / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def one_node(cluster, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "answers.jsonl"
    run = sbatch(cluster, "slurm/tiny.sh", "output.raw=true", INPUT=str(prompts), OUTPUT=str(out))
    assert run.returncode == 0, run.stderr + job_logs(cluster)
    return sorted(read_records(out), key=lambda r: r["index"])  # replicas finish in any order


def test_one_node_job_writes_every_parsed_record(one_node):
    assert [r["id"] for r in one_node] == [p["id"] for p in PROMPTS]
    assert all(r["usage"]["completion_tokens"] > 0 and "raw" in r for r in one_node)


def test_two_node_job_matches_the_one_node_job(cluster, prompts, one_node, tmp_path):
    out = tmp_path / "answers.jsonl"
    # tp=4 over 2 nodes x 2 ranks: one replica whose tensor-parallel collectives cross the nodes' networks.
    run = sbatch(
        cluster, "--nodes=2", "slurm/tiny.sh", "parallel.tp=4", "output.raw=true", INPUT=str(prompts), OUTPUT=str(out)
    )
    assert run.returncode == 0, run.stderr + job_logs(cluster)
    assert json.loads((tmp_path / "answers.jsonl.metrics.json").read_text())["world_size"] == 4
    assert list(map(without_timing, sorted(read_records(out), key=lambda r: r["index"]))) == list(
        map(without_timing, one_node)
    )


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "timing"}


def test_a_rendezvous_on_localhost_fails_across_nodes(cluster, prompts, tmp_path):
    """The control for the test above: each node's localhost is its own, as on a real cluster."""
    out = tmp_path / "answers.jsonl"
    run = sbatch(
        cluster,
        "--nodes=2",
        "slurm/tiny.sh",
        INPUT=str(prompts),
        OUTPUT=str(out),
        RDZV_HOST="localhost",
        RDZV_JOIN_TIMEOUT="15",
    )
    assert run.returncode != 0
    assert not out.exists() or not out.read_text()


def test_array_tasks_split_the_input_and_merge_in_order(cluster, prompts, tmp_path):
    out = tmp_path / "answers.jsonl"
    run = sbatch(cluster, "--array=0-1", "slurm/tiny.sh", INPUT=str(prompts), OUTPUT=str(out))
    assert run.returncode == 0, run.stderr + job_logs(cluster)
    shards = sorted(tmp_path.glob("answers.shard-*-of-2.jsonl"))
    assert [len(read_records(s)) for s in shards] == [3, 3]
    merge = subprocess.run(
        ["python", str(ROOT / "launch" / "merge.py"), str(out), *map(str, shards), "--input", str(prompts)],
        capture_output=True,
        text=True,
    )
    assert merge.returncode == 0, merge.stderr
    assert [r["id"] for r in read_records(out)] == [p["id"] for p in PROMPTS]


def job_state(cluster, job: str) -> dict:
    fields = slurm(cluster, "scontrol", "show", "job", job, "-o").stdout.split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def test_preempted_job_requeues_and_resumes_losing_nothing(cluster, tmp_path):
    many = write_jsonl(tmp_path / "many.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}"} for i in range(16)])
    out = tmp_path / "answers.jsonl"
    slow = ["generation.batch_size=1", "generation.max_new_tokens=48", "output.echo=false"]
    job = sbatch(cluster, "slurm/tiny.sh", *slow, wait=False, INPUT=str(many), OUTPUT=str(out)).stdout.strip()
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline, job_logs(cluster)
        time.sleep(0.1)
    # What `#SBATCH --signal=B:TERM@120` does before a time limit or preemption: signal the batch shell.
    slurm(cluster, "scancel", "--batch", "--signal=TERM", job)
    # The first run ends (for a moment FAILED, its exit code) and is requeued; the second must complete.
    pending_since = None
    while (state := job_state(cluster, job)).get("JobState") != "COMPLETED":
        assert time.monotonic() < deadline + 120, f"{state.get('JobState')}\n{job_logs(cluster)}"
        if state.get("JobState") == "PENDING":
            pending_since = pending_since or time.monotonic()
            # Slurm delays a requeued job's start (so the node has revoked the first run's credential before the
            # second starts); the test shortens the wait to a few seconds rather than sit it out.
            if time.monotonic() - pending_since > 5:
                slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")
        time.sleep(0.5)
    assert state["Restarts"] == "1"
    assert "received SIGTERM" in job_logs(cluster, tail=None)
    ids = [r["id"] for r in read_records(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(16))


def test_two_node_expert_parallel_mxfp4_owns_experts_by_global_rank(cluster, prompts, mxfp4_checkpoints, tmp_path):
    """One rank a node: both ranks have LOCAL_RANK 0, so experts split by LOCAL_RANK would be the same half twice."""
    answers = {}
    for kind, extra in (("reference", []), ("mxfp4", ["--nodes=2", "slurm/tiny.sh", "parallel.ep=2"])):
        out = tmp_path / f"{kind}.jsonl"
        args = extra or ["slurm/tiny.sh"]
        run = sbatch(
            cluster,
            *args,
            f"model.path={mxfp4_checkpoints[kind]}",
            "output.raw=true",
            INPUT=str(prompts),
            OUTPUT=str(out),
            NPROC_PER_NODE="1",
        )
        assert run.returncode == 0, run.stderr + job_logs(cluster)
        answers[kind] = {r["id"]: r["raw"] for r in read_records(out)}
    assert answers["mxfp4"] == answers["reference"]


def test_scaling_sweep_runs_as_job_arrays_across_nodes_then_merges(cluster, tmp_path):
    """A task a job, one array per GPU count: tp=2 spans both nodes (a rank on each), `1` is one rank; a server
    across the nodes is found wherever its rank 0 is; the merge job draws the report once every task has ended. (The
    plain recipe's curve is tests/test_scaling.py's.)"""
    out = tmp_path / "sweep"
    run = slurm(
        cluster,
        "timeout",
        "600",
        "python",
        "launch/scaling.py",
        "submit",
        "--out",
        str(out),
        "--layouts",
        "1",
        "tp=2",
        "--paths",
        "launcher",
        "server",
        *TINY_SWEEP,
        "--ranks-per-node",
        "1",
        "--cpu",
        "--wait",
        f"--sbatch=--output={cluster}/%x-%A_%a.out",
        "--sbatch=--time=10",
        timeout=630,
    )
    assert run.returncode == 0, run.stderr + job_logs(cluster)
    rows = assert_report(out, curves=4)
    assert sorted((r["layout"], r["path"], r["concurrency"], r["nodes"]) for r in rows) == sorted(
        (layout, path, c, nodes)
        for layout, nodes in (("1", "1"), ("tp=2", "2"))
        for path in ("launcher", "server")
        for c in ("1", "2")
    )
