"""The launcher end to end: real torchrun processes on gloo, the tiny checkpoint, harmony in and out."""

import json
import os
import re
import signal
import time

import pytest
import torch
from transformers import GptOssForCausalLM

from parallel.loading.checkpoint import TINY, resolve_checkpoint
from parallel.protocol.harmony import render_prompt
from parallel.protocol.requests import parse_line
from tests.conftest import launch, read_records, write_jsonl

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
GOOD = [
    {"id": "p1", "prompt": "Say hello."},
    {
        "id": "p2",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "reasoning_effort": "low",
    },
    {"id": "p3", "prompt": "Use the tool.", "tools": [TOOL]},
    {"id": "p4", "prompt": "A long answer, please.", "max_new_tokens": 7},
    {"id": 5, "messages": [{"role": "developer", "content": "Rhyme."}, {"role": "user", "content": "Cats"}]},
    {"prompt": "No id here: the line number is the id."},
]
BAD = [
    '{"id": "broken", "prompt": ',
    {"id": "wizard", "messages": [{"role": "wizard", "content": "x"}]},
    {"id": "empty", "messages": []},
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("in") / "prompts.jsonl", GOOD + BAD)


@pytest.fixture(scope="module")
def reference(enc):
    """Greedy tokens of a single-process model.generate, one unpadded prompt at a time."""
    model = GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY)).eval()
    stop = enc.stop_tokens_for_assistant_actions()
    tokens = {}
    for index, line in enumerate(GOOD, start=1):
        req = parse_line(json.dumps(line), index)
        ids = torch.tensor([render_prompt(enc, req, "medium")])
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=req.max_new_tokens or MAX_NEW,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=199999,
            )
        new = out[0, ids.shape[1] :].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
        tokens[req.id] = new[:cut]
    return tokens


LAYOUTS = [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.ep=2"]),
    (2, ["parallel.dp=2"]),
    (2, ["parallel.dp=2", "engine.mode=always", "engine.slots=1"]),  # requests through one slot, one after another
    (2, ["parallel.tp=2", "engine.mode=always", "engine.attention=triton"]),  # the Triton kernels on each rank's heads
    (2, ["parallel.ep=2", "engine.mode=always"]),
    # prompts prefilled in 24-token chunks over 4-token blocks, three requests at a time, in every dimension at once
    (
        4,
        [
            "parallel.tp=2",
            "parallel.ep=2",
            "parallel.dp=2",
            "engine.mode=always",
            "engine.slots=3",
            "engine.max_batched_tokens=24",
            "engine.block_size=4",
        ],
    ),
    (2, ["parallel.pp=2"]),
    (4, ["parallel.dp=2", "parallel.tp=2"]),
]


@pytest.mark.parametrize("nproc, overrides", LAYOUTS, ids=[" ".join(o) for _, o in LAYOUTS])
def test_every_layout_matches_single_process_greedy(tmp_path, prompts, reference, enc, nproc, overrides):
    out = tmp_path / "answers.jsonl"
    run = launch(
        out,
        *overrides,
        f"generation.max_new_tokens={MAX_NEW}",
        "generation.batch_size=2",
        "output.raw=true",
        nproc=nproc,
        prompts=prompts,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert ("generation: the engine" in run.stderr) == ("engine.mode=always" in overrides)  # not the fallback
    assert ("attention via Triton kernels" in run.stderr) == ("engine.attention=triton" in overrides)
    records = {r["index"]: r for r in read_records(out)}
    assert sorted(records) == list(range(1, len(GOOD) + len(BAD) + 1))
    for index, expected in enumerate(reference.values(), start=1):
        r = records[index]
        assert r["raw"] == enc.decode(expected), f"line {index} differs under {overrides}"
        assert r["usage"]["completion_tokens"] == len(expected)
        assert r["finish_reason"] in ("stop", "tool_call", "length", "error")
    assert records[6]["id"] == 6
    assert records[4]["usage"]["completion_tokens"] <= 7
    assert (out.parent / "answers.jsonl.config.yaml").exists()
    assert '"requests": 6' in (out.parent / "answers.jsonl.metrics.json").read_text()


def test_every_replica_of_a_batch_job_gets_work(tmp_path, prompts):
    """Each replica asks for room enough for the whole input: the first to ask must not take it all."""
    run = launch(
        tmp_path / "answers.jsonl",
        "parallel.dp=2",
        "engine.mode=always",
        "generation.max_new_tokens=4",
        nproc=2,
        prompts=prompts,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    steps = {
        int(r): sum(map(int, n))
        for r, *n in re.findall(r"replica (\d): engine: decode steps (\d+) .*?mixed steps (\d+)", run.stderr)
    }
    assert steps.keys() == {0, 1} and min(steps.values()) > 0, run.stderr


def test_bad_lines_cost_only_themselves(tmp_path, prompts):
    out = tmp_path / "answers.jsonl"
    run = launch(out, "generation.max_new_tokens=4", prompts=prompts)
    assert run.returncode == 0, run.stderr
    by_index = {r["index"]: r for r in read_records(out)}
    errors = {i: by_index[i]["error"] for i in range(len(GOOD) + 1, len(GOOD) + len(BAD) + 1)}
    assert "not valid JSON" in errors[7] and "unknown role 'wizard'" in errors[8] and "non-empty list" in errors[9]
    assert all(by_index[i]["finish_reason"] == "error" for i in errors)
    assert all(by_index[i]["usage"]["completion_tokens"] > 0 for i in range(1, len(GOOD) + 1))


def test_sampling_is_reproducible_for_a_seed(tmp_path, prompts):
    def sample(name, seed):
        out = tmp_path / f"{name}.jsonl"
        assert launch(out, "generation.temperature=1.0", f"generation.seed={seed}", prompts=prompts).returncode == 0
        return [r.get("raw") for r in read_records(out)]

    assert sample("a", 3) == sample("b", 3) != sample("c", 4)


def test_impossible_layout_is_rejected_before_loading(tmp_path, prompts):
    out = tmp_path / "answers.jsonl"
    run = launch(out, "parallel.tp=3", prompts=prompts)
    assert run.returncode == 2
    assert "parallel.tp=3 does not divide the model's 8 attention heads" in run.stderr
    assert "loading" not in run.stderr and not out.exists()


def test_missing_checkpoint_is_named(tmp_path, prompts):
    run = launch(tmp_path / "a.jsonl", "model.path=/nonexistent/gpt-oss", prompts=prompts)
    assert run.returncode == 2 and "model.path=/nonexistent/gpt-oss: no such folder" in run.stderr


def test_unknown_builtin_model_lists_the_builtins(tmp_path, prompts):
    run = launch(tmp_path / "a.jsonl", "model.path=builtin:tin", prompts=prompts)
    assert run.returncode == 2 and "model.path=builtin:tin is no built-in model" in run.stderr
    assert "builtin:tiny, builtin:gpt-oss-20b" in run.stderr


# Long enough that a signal lands mid-job: 16 single-request batches of 48 tokens.
@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return write_jsonl(
        tmp_path_factory.mktemp("many") / "many.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}"} for i in range(16)]
    )


SLOW = ["parallel.dp=2", "generation.batch_size=1", "generation.max_new_tokens=48", "output.echo=false"]


def wait_for_lines(path, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} lines")


def test_stopped_job_resumes_with_every_id_once(tmp_path, many):
    out = tmp_path / "answers.jsonl"
    job = launch(out, *SLOW, nproc=2, prompts=many, wait=False)
    wait_for_lines(out, 2, job)
    os.killpg(job.pid, signal.SIGTERM)  # what Slurm does at preemption: every process of the step
    log = job.communicate(timeout=60)[0]
    assert job.returncode != 0
    assert "received SIGTERM" in log and "run again with the same data.output to resume" in log
    kept = read_records(out)
    assert 0 < len(kept) < 16

    rerun = launch(out, *SLOW, nproc=2, prompts=many)
    assert rerun.returncode == 0, rerun.stderr
    ids = [r["id"] for r in read_records(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(16))
    assert read_records(out)[: len(kept)] == kept


def test_a_finished_job_run_again_stops_before_loading_and_keeps_its_metrics(tmp_path, prompts):
    out = tmp_path / "answers.jsonl"
    assert launch(out, "generation.max_new_tokens=2", prompts=prompts).returncode == 0
    records, metrics = out.read_bytes(), (tmp_path / "answers.jsonl.metrics.json").read_text()

    again = launch(out, "generation.max_new_tokens=2", nproc=2, prompts=prompts)
    assert again.returncode == 0 and "nothing to do" in again.stderr and "loading" not in again.stderr, again.stderr
    assert out.read_bytes() == records and (tmp_path / "answers.jsonl.metrics.json").read_text() == metrics


def rank_pid(torchrun: int, rank: int) -> int:
    """The worker torchrun started for `rank` (its child whose environment says so)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == torchrun and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"torchrun {torchrun} has no rank {rank} worker")


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_rank_ends_the_job_naming_it(tmp_path, many, how):
    out = tmp_path / "answers.jsonl"
    job = launch(out, *SLOW, "runtime.heartbeat_timeout_s=3", nproc=2, prompts=many, wait=False)
    wait_for_lines(out, 1, job)
    start = time.monotonic()
    os.kill(rank_pid(job.pid, 1), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        log = job.communicate(timeout=90)[0]
    finally:
        os.killpg(job.pid, signal.SIGKILL) if job.poll() is None else None
    assert job.returncode != 0 and time.monotonic() - start < 90
    named = (
        "rank 1 sent no heartbeat" in log
        if how == "hung"
        else ("rank 1 sent no heartbeat" in log or "rank      : 1" in log)
    )
    assert named, log[-3000:]
    ids = [r["id"] for r in read_records(out)]  # every written line is whole JSON, none twice
    assert len(ids) == len(set(ids))
