"""launch/scaling.py on CPU with the tiny model: a sweep of two layouts and two concurrencies through the real launcher
and the real server under streaming clients, with the plain recipe's curve, killed after its first point and run
again; then its report. The Slurm side (job arrays across two nodes, the merge) is in tests/test_slurm.py."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import pytest

from parallel.bench.measure import ServerJob, clients
from parallel.bench.scaling.slurm import placement
from parallel.bench.scaling.sweep import Sweep, degrees, named_sets
from tests.conftest import ROOT

NEW_TOKENS, ROUNDS = 8, 2
# engine.mode=always: the engine on CPU too
TINY_SWEEP = [
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--concurrency",
    "1",
    "2",
    "--workload",
    "fixed",
    "--prompt-tokens",
    "16",
    "--new-tokens",
    str(NEW_TOKENS),
    "--rounds",
    str(ROUNDS),
    "engine.mode=always",
]


def scaling(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "scaling.py"), *args]


def assert_report(out, curves: int) -> list[dict]:
    """The report's files hold real figures: every point's numbers > 0, PNGs that decode, a summary row a curve."""
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert len(json.loads((out / "results.json").read_text())["points"]) == len(rows)
    for r in rows:
        for key in (
            "output_tokens_per_s",
            "output_tokens_per_s_per_gpu",
            "tokens_per_s_per_user",
            "ttft_p50_s",
            "seconds",
        ):
            assert float(r[key]) > 0, (key, r)
    for png in ("front.png", "scaling.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = plt.imread(out / png).shape
        assert height > 500 and width > 800
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ") and "GPU" in line]
    assert len(table) == 1 + curves  # the header, then a row a curve
    return rows


def test_a_killed_sweep_reruns_only_its_missing_points(tmp_path):
    out = tmp_path / "sweep"
    cmd = scaling(
        "run",
        "--out",
        str(out),
        "--layouts",
        "1",
        "dp=2",
        "--paths",
        "launcher",
        "server",
        "plain",
        "--plain-concurrency",
        "2",
        *TINY_SWEEP,
    )
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "points").glob("*.json")):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the job it was running: the second, a launcher point
    first.wait()
    done = {p.name: p.read_text() for p in (out / "points").glob("*.json")}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} points already measured in {out}, {10 - len(done)} to measure" in rerun.stderr
    assert {p.name: p.read_text() for p in (out / "points").glob("*.json") if p.name in done} == done

    rows = assert_report(out, curves=6)
    assert sorted((r["layout"], r["path"], r["concurrency"]) for r in rows) == sorted(
        [(layout, path, c) for layout in ("1", "dp=2") for path in ("launcher", "server") for c in ("1", "2")]
        + [("1", "plain", "2"), ("dp=2", "plain", "2")]
    )
    for r in rows:  # every request ran to its budget: rounds x concurrency of them, the plain recipe one batch
        requests = int(r["concurrency"]) * (1 if r["path"] == "plain" else ROUNDS)
        assert (int(r["requests"]), int(r["output_tokens"])) == (requests, requests * NEW_TOKENS)
        assert r["gpus"] == ("1" if r["layout"] == "1" else "2") and r["machine"].startswith("CPU")
        assert (float(r["itl_p50_s"]) > 0) if r["path"] == "server" else r["itl_p50_s"] == ""  # clients see the gaps
        log = r["point"].rsplit("_", 1)[0] if r["path"] == "server" else r["point"]  # a server's log is its job's
        generation = "generation: plain model.generate" if r["path"] == "plain" else "generation: the engine"
        assert generation in (out / "logs" / f"{log}.log").read_text()
    assert "| dp=2 (2 GPUs) · server | 2 |" in (out / "summary.md").read_text()


def test_a_failed_job_is_named_and_its_points_left_for_the_next_run(tmp_path):
    out = tmp_path / "sweep"
    run = subprocess.run(
        scaling(
            "run",
            "--out",
            str(out),
            "--paths",
            "launcher",
            "--variant",
            "bad:model.path=/nonexistent",
            *TINY_SWEEP,
            "--concurrency",
            "1",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "tiny_bad_1gpu_launcher failed" in run.stderr and "model.path=/nonexistent: no such folder" in run.stderr
    assert (
        "Not measured (1 points; rerun the sweep to measure only these): tiny_bad_1gpu_launcher_c1"
        in (out / "summary.md").read_text()
    )
    assert not list((out / "points").iterdir()) and not (out / "front.png").exists()


@pytest.mark.parametrize(
    "override, named",
    [
        ("generation.max_new_token=3", "generation.max_new_token"),
        ("--variant=bad:engine.block_size=3", "engine.block_size=3 must be a power of two"),
        ("--model=t:config=tiny.yml", "config tiny.yml: no such file"),
    ],
)
def test_a_bad_override_is_refused_before_the_sweep_is_saved(tmp_path, override, named):
    out = tmp_path / "sweep"
    run = subprocess.run(
        scaling("run", "--out", str(out), "--paths", "launcher", *TINY_SWEEP, override),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and named in run.stderr, run.stderr
    assert not out.exists()


def test_a_report_of_a_folder_without_a_sweep_is_refused(tmp_path):
    run = subprocess.run(scaling("report", "--out", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "holds no sweep" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_sweep_resumed_under_other_conditions_is_refused(tmp_path):
    out = tmp_path / "sweep.json"
    Sweep("a.yaml", [], {"m": []}, {"engine": []}, ["1"], ["launcher"], [1], [], {"kind": "fixed"}, 2).save(out)
    Sweep("a.yaml", [], {"m": []}, {"engine": []}, ["1", "tp=2"], ["launcher"], [1, 4], [], {"kind": "fixed"}, 2).save(
        out
    )
    with pytest.raises(ValueError, match="other overrides, rounds"):
        Sweep("a.yaml", ["x.y=1"], {"m": []}, {"engine": []}, ["1"], ["launcher"], [1], [], {"kind": "fixed"}, 3).save(
            out
        )


def test_sweep_plan_jobs_and_slurm_placement():
    sweep = Sweep(
        "c.yaml",
        ["model.load_format=dummy"],
        {"20b": ["model.path=builtin:gpt-oss-20b"]},
        named_sets(["bf16", "mxfp4:model.mxfp4=require,engine.slots=64"]),
        ["1", "dp=2,tp=2"],
        ["server", "launcher", "plain"],
        [1, 64],
        [8],
        {"kind": "sharegpt"},
        4,
    )
    jobs = sweep.jobs()
    # a layout: one server job a variant (all concurrencies), a launcher job a variant and concurrency, plain per batch
    assert [j.name for j in jobs[:4]] == [
        "20b_bf16_1gpu_server",
        "20b_mxfp4_1gpu_server",
        "20b_bf16_1gpu_launcher",
        "20b_bf16_1gpu_launcher",
    ]
    assert len(jobs) == 2 * (2 + 4 + 1) and jobs[-1].point(8) == "20b_dp2-tp2_plain_c8"
    assert sweep.job_config(jobs[1]) == (
        "c.yaml",
        ["model.load_format=dummy", "model.path=builtin:gpt-oss-20b", "model.mxfp4=require", "engine.slots=64"],
    )
    assert sweep.job_config(jobs[-1])[1][-3:] == ["parallel.dp=2", "parallel.tp=2", "engine.mode=never"]
    other = Sweep(
        "c.yaml",
        [],
        {"120b": ["config=b.yaml", "model.path=x"]},
        {"e": []},
        ["1"],
        ["launcher"],
        [1],
        [],
        {"kind": "fixed"},
        1,
    )
    assert other.job_config(other.jobs()[0]) == ("b.yaml", ["model.path=x"])  # a model may name its own config
    assert jobs[-1].gpus == 4 and jobs[-1].per_replica(8) == 4 and sweep.workload_size() == 256
    assert [placement(g, 8) for g in (1, 8, 16)] == [(1, 1), (1, 8), (2, 8)]
    with pytest.raises(ValueError, match="does not fill nodes of 8"):
        placement(12, 8)
    for bad in ("tp2", "tp=0", "xp=2", ""):
        with pytest.raises(ValueError, match="layout"):
            degrees(bad)
    for bad in (["mxfp4:model.mxfp4"], ["a_b"], ["bf16", "bf16:engine.slots=2"]):
        with pytest.raises(ValueError, match="key=value"):
            named_sets(bad)


def test_clients_spread_over_processes_measure_every_stream(tmp_path):
    """The benchmark's clients in two processes (as on a GPU host, where one would cap what it measures): every
    request streamed once, to its budget, each with its chunks' times, the run timed from the first start to the
    last end."""
    requests = [{"prompt": f"Tell me about the number {i}.", "max_new_tokens": NEW_TOKENS} for i in range(6)]
    with ServerJob(str(ROOT / "configs" / "tiny.yaml"), 1, ["engine.mode=always"], tmp_path / "server.log") as server:
        run = clients(server, requests, concurrency=4, processes=2)
    assert run["processes"] == 2 and 0 < run["cpu"] and run["seconds"] > 0
    assert sorted(r["request"] for r in run["results"]) == list(range(6))
    assert [r["tokens"] for r in run["results"]] == [NEW_TOKENS] * 6
    assert all(len(r["stamps"]) >= 1 and r["ttft"] <= r["end"] <= run["seconds"] for r in run["results"])


def test_the_isolated_bench_decodes_as_the_generation_config_says(tmp_path):
    """launch/bench.py's engine in-process samples where generation.temperature is set, its report says how it
    decoded, and each row counts its distinct tokens (a collapsed run, as NaN logits make one, shows there)."""
    runs = {}
    for temperature in ("0", "1.0"):
        out = tmp_path / f"{temperature}.json"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "bench.py"),
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--paths",
                "isolated",
                "--batch-sizes",
                "4",
                "--new-tokens",
                "16",
                "--requests",
                "4",
                "--workdir",
                str(tmp_path / temperature),
                "--out",
                str(out),
                f"generation.temperature={temperature}",
            ],
            check=True,
            capture_output=True,
        )
        runs[temperature] = json.loads(out.read_text())
    assert runs["0"]["decoding"] == "greedy" and runs["1.0"]["decoding"] == "sampled, temperature 1.0, top_p 1.0"
    greedy, sampled = (runs[t]["runs"][0] for t in ("0", "1.0"))
    assert greedy["output_tokens"] == sampled["output_tokens"] == 4 * 16
    assert sampled["distinct_tokens"] > greedy["distinct_tokens"]


def log_holders(log, but: int) -> set[int]:
    """The processes other than `but` with `log` open: a job's, which write their output to it."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != but and any(
                os.readlink(f"/proc/{pid}/fd/{fd}") == str(log) for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                held.add(int(pid))
        except OSError:
            continue
    return held


@pytest.mark.parametrize("path, log", [("server", "server.log"), ("launcher", "out.jsonl.log")])
def test_a_bench_stopped_by_sigterm_ends_the_job_it_started(tmp_path, path, log):
    """`timeout` and Slurm's time limits stop a bench with SIGTERM, here while its job loads; the job runs in a
    session of its own (torchrun's ranks in theirs), so unless the bench ends it, it outlives the bench and holds
    the GPUs."""
    with open(tmp_path / "bench.out", "w") as out:
        bench = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "launch" / "bench.py"),
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--paths",
                path,
                "--workload",
                "fixed",
                "--requests",
                "2",
                "--concurrency",
                "2",
                "--workdir",
                str(tmp_path),
                "engine.mode=always",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    log = tmp_path / log
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and b"] loading " in log.read_bytes()):  # rank 0 loads before the job does any work
            assert time.monotonic() < deadline and bench.poll() is None, (tmp_path / "bench.out").read_text()
            time.sleep(0.2)
        assert log_holders(log, but=bench.pid)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 130, (tmp_path / "bench.out").read_text()
        deadline = time.monotonic() + 60
        while log_holders(log, but=bench.pid):
            assert time.monotonic() < deadline, f"the {path} outlived its bench: {log_holders(log, but=bench.pid)}"
            time.sleep(0.5)
    finally:
        bench.kill()
        for pid in log_holders(log, but=os.getpid()):
            os.kill(pid, signal.SIGKILL)
