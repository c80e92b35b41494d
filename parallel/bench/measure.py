"""Measuring the paths users run, each as a real job in its own processes: the launcher on a workload file, and
the server under a number of concurrent streaming clients. `launch/bench.py` and `launch/scaling.py` call these.

Every figure comes from the job itself: the launcher's metrics and records (generation time excludes loading),
the server's streamed chunks as a client sees them (time to first token, inter-token latency).

Jobs start on this machine (torchrun), or, where GPT_OSS_TORCHRUN names a wrapper (slurm/scaling.sh sets
slurm/torchrun.sh), through it: one torchrun on every node of a Slurm allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WARM_UP_TOKENS = 16


def job_env() -> dict[str, str]:
    """This environment without a process group's variables: a job started from a process that has joined one
    (bench.py's in-process runs) must not inherit its rank or its store's port."""
    joined = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in joined and not k.startswith("TORCHELASTIC_")}


def torchrun(script: str, nproc: int) -> list[str]:
    """The command that starts `script` on nproc ranks. The wrapper takes its ranks from the allocation."""
    wrapper = os.environ.get("GPT_OSS_TORCHRUN")
    if wrapper:
        runner = [wrapper]
    elif nproc > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    else:
        runner = [sys.executable]
    return [*runner, str(ROOT / "launch" / script)]


def machine() -> str:
    """The accelerator the jobs run on, as nvidia-smi names it, else the CPU. Asked of nvidia-smi rather than torch:
    a CUDA context in this process would take GPU memory from the jobs it measures."""
    try:
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        run = None
    name = run.stdout.split("\n")[0].strip() if run and run.returncode == 0 else ""
    return name or f"CPU ({os.cpu_count()} cores)"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))], 4)


def run_launcher(
    config: str, workload: Path, out: Path, nproc: int, overrides: list[str], timeout_s: float = 3600
) -> dict:
    """One batch job (its log beside its output, as it runs); its metrics plus output tok/s, total tok/s and the
    records' time-to-first-token spread."""
    out.unlink(missing_ok=True)
    cmd = [
        *torchrun("generate.py", nproc),
        "--config",
        config,
        f"data.input={workload}",
        f"data.output={out}",
        "runtime.progress=false",
        "output.echo=false",
        *overrides,
    ]
    log = Path(f"{out}.log")
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True)
        try:
            code = job.wait(timeout=timeout_s)
        finally:
            end_job(job)
    stderr = log.read_text()
    if code:
        raise RuntimeError(f"launcher failed ({' '.join(overrides)}):\n{stderr[-4000:]}")
    metrics = json.loads(Path(f"{out}.metrics.json").read_text())
    records = [json.loads(line) for line in out.read_text().split("\n") if line]
    first = [r["timing"]["queued_s"] + r["timing"]["first_token_s"] for r in records if "timing" in r]
    seconds = metrics["generation_s"]
    return {
        "requests": metrics["requests"],
        "errors": metrics["errors"],
        "prompt_tokens": metrics["prompt_tokens"],
        "output_tokens": metrics["generated_tokens"],
        "seconds": seconds,
        "output_tokens_per_s": round(metrics["generated_tokens"] / seconds, 1),
        "total_tokens_per_s": round((metrics["generated_tokens"] + metrics["prompt_tokens"]) / seconds, 1),
        "ttft_p50_s": percentile(first, 50),
        "ttft_p99_s": percentile(first, 99),
        "last_first_token_s": round(max(first), 3) if first else None,
        "peak_gpu_memory_gib": metrics["peak_gpu_memory_gib"],
        "layout": metrics["layout"],
        "backend": [line.split("] ", 1)[1] for line in stderr.splitlines() if "] replica " in line],
    }


def end_job(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Stop a job started in a session of its own, if it still runs: SIGTERM, which torchrun hands on to its ranks
    (they run in sessions of their own, so only torchrun can end them), then SIGKILL after grace_s, or at once when
    another stop comes while waiting."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if not isinstance(e, subprocess.TimeoutExpired):
            raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerJob:
    """launch/serve.py in its own processes for the length of a `with` block, behind a key of its own. Its HTTP runs
    on rank 0: on this machine, or, for a job across nodes (torchrun ranks the nodes in an order of its own), on
    one of `hosts`: it then listens on every interface, and is found by asking each host."""

    def __init__(self, config: str, nproc: int, overrides: list[str], log: Path, hosts: list[str] | None = None):
        self.port, self.key = free_port(), secrets.token_urlsafe(16)
        self.hosts = hosts or ["127.0.0.1"]
        bind = ["server.host=0.0.0.0"] if hosts else []
        self.cmd = [*torchrun("serve.py", nproc), "--config", config, f"server.port={self.port}", *bind, *overrides]
        self.log_path = log

    def __enter__(self) -> ServerJob:
        self.log, self.proc = open(self.log_path, "w"), None
        try:  # a stop while it loads ends it too: `with` calls __exit__ only once __enter__ has returned
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**job_env(), "GPT_OSS_API_KEY": self.key},
            )
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline and self.proc.poll() is None:
                for host in self.hosts:
                    try:
                        health = json.load(urllib.request.urlopen(f"http://{host}:{self.port}/health", timeout=2))
                        self.url, self.model = f"http://{host}:{self.port}", health["model"]
                        return self
                    except OSError:
                        pass
                time.sleep(1)
            raise RuntimeError(f"the server did not come up; see {self.log.name}")
        except BaseException:
            self.__exit__()
            raise

    def health(self) -> dict:
        return json.load(urllib.request.urlopen(f"{self.url}/health", timeout=30))

    def __exit__(self, *exc) -> None:
        try:
            if self.proc is not None:
                end_job(self.proc)
        finally:
            self.log.close()


# Streams one client process drives. One asyncio loop with the official client parses some 5,000 streamed chunks a
# second at a full core (a raw SSE server and one process: 4,675 chunks/s here); 256 streams of a fast engine send
# more than that, so a single client process would measure itself, not the server.
STREAMS_A_CLIENT = 32


def client_processes(concurrency: int) -> int:
    """How many processes share the clients: a process a STREAMS_A_CLIENT streams, leaving half the cores to the job."""
    return max(1, min(-(-concurrency // STREAMS_A_CLIENT), (os.cpu_count() or 2) // 2))


async def _stream(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: when each chunk of tokens arrived."""
    start = time.perf_counter()
    stamps, tokens = [], 0
    # No temperature: the server's generation.temperature decides, as the launcher's does for the batch job.
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter() - start)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {
        "ttft": stamps[0] if stamps else None,
        "end": time.perf_counter() - start,
        "tokens": tokens,
        "stamps": stamps,
    }


async def _client_streams(url: str, key: str, model: str, requests: list[dict], streams: int, claim) -> list[dict]:
    import openai

    # Closed within its event loop: asyncio.run ends the loop, and a client left to the garbage collector would
    # close its connections on that dead loop, with a traceback.
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=3600) as client:

        async def stream_in_turn() -> list[dict]:
            done = []
            while (i := claim()) is not None:
                r = requests[i]
                done.append({"request": i, **await _stream(client, model, r["prompt"], r["max_new_tokens"])})
            return done

        return [r for part in await asyncio.gather(*(stream_in_turn() for _ in range(streams))) for r in part]


def _client_process(url: str, key: str, model: str, requests: list[dict], streams: int, taken, ready, results) -> None:
    """A client process: `streams` streams, each taking the next request not yet taken by any process (`taken`, a
    shared counter) as its last one ends, once every process is ready; what it measured (or its error) and the
    wall clock and CPU time it took go to `results`."""
    import openai  # noqa: F401 - imported before the clock starts: a second or so of a cold start is no one's speed

    def claim() -> int | None:
        with taken.get_lock():
            i = taken.value
            taken.value = i + 1
        return i if i < len(requests) else None

    ready.wait(timeout=600)
    start, cpu = time.time(), time.process_time()
    try:
        out = asyncio.run(_client_streams(url, key, model, requests, streams, claim))
    except Exception as e:  # noqa: BLE001 - the parent says which concurrency failed, and where the log is
        results.put({"error": repr(e)})
        return
    results.put({"results": out, "start": start, "end": time.time(), "cpu_s": time.process_time() - cpu})


def clients(server: ServerJob, requests: list[dict], concurrency: int, processes: int | None = None) -> dict:
    """`requests` through `concurrency` concurrent streams spread over client processes (by default
    client_processes(concurrency) of them), every stream taking the next request as its last one ends, as one
    closed loop would: a fixed share a process would leave the run to the process with the longest share. Every
    result (with its request's index), the seconds from the first start to the last end, the busiest process's
    CPU share."""
    n = min(processes or client_processes(concurrency), concurrency)  # every process drives a stream at least
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
    ready, results = spawn.Barrier(n), spawn.Queue()  # the processes start together, once all are up
    taken = spawn.Value("q", 0)
    workers = [
        spawn.Process(
            target=_client_process,
            daemon=True,
            args=(
                server.url,
                server.key,
                server.model,
                requests,
                concurrency // n + (i < concurrency % n),
                taken,
                ready,
                results,
            ),
        )
        for i in range(n)
    ]
    for w in workers:
        w.start()
    parts = []
    try:
        while len(parts) < n:
            try:
                parts.append(results.get(timeout=5))
            except queue.Empty:  # a process that died without a word would otherwise be waited for forever
                codes = [w.exitcode for w in workers]
                if any(code not in (None, 0) for code in codes):
                    raise RuntimeError(f"a client process died (exit codes {codes})") from None
    except BaseException:  # a stop too: clients left streaming would hold up the server's drain
        for w in workers:
            w.kill()
        raise
    for w in workers:
        w.join()
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        raise RuntimeError(errors[0])
    start, end = min(p["start"] for p in parts), max(p["end"] for p in parts)
    return {
        "results": [r for p in parts for r in p["results"]],
        "seconds": end - start,
        "processes": n,
        "cpu": max(p["cpu_s"] / max(p["end"] - p["start"], 1e-9) for p in parts),
    }


def run_server(
    config: str,
    workload: Path,
    nproc: int,
    concurrency: list[int],
    overrides: list[str],
    log: Path,
    rounds: int | None = None,
    hosts: list[str] | None = None,
) -> Iterator[dict]:
    """One server, measured at each concurrency in turn (no restart between them), yielding each one's figures as
    they come: throughput as the clients see it, time to first token and inter-token latency (the gap between
    chunks, per token), and how busy the clients and the server's process were. At concurrency c the clients send
    the first rounds x c requests of the workload (all of them when rounds is None), after a warm-up of c short
    requests: the engine's first steps at that many rows are its slow ones (graph capture, compilation). `hosts`:
    where rank 0 may be, for a job across nodes (ServerJob)."""
    requests = [json.loads(line) for line in workload.read_text().split("\n") if line]
    with ServerJob(config, nproc, ["server.stream_interval=1", *overrides], log, hosts) as server:
        for c in concurrency:
            warm_up = [{**r, "max_new_tokens": WARM_UP_TOKENS} for r in requests[:c]]
            try:
                clients(server, warm_up, c)
                before = server.health()
                run = clients(server, requests[: rounds * c] if rounds else requests, c)
                after = server.health()
            except (RuntimeError, OSError) as e:  # the server failed or refused: its log says why
                raise RuntimeError(f"server at concurrency {c}: {e}; see {log}") from e
            yield {
                **_stream_figures(run["results"], run["seconds"], c),
                "client_processes": run["processes"],
                "client_cpu_max": round(run["cpu"], 2),
                **{
                    f"server_{k}_cpu": round((after[f"{k}_cpu_s"] - before[f"{k}_cpu_s"]) / run["seconds"], 2)
                    for k in ("http", "process")
                },
            }


def _stream_figures(results: list[dict], seconds: float, concurrency: int) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [(b - a) for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {
        "requests": len(results),
        "concurrency": concurrency,
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "tokens_per_s_per_stream": round(statistics.mean(r["tokens"] / r["end"] for r in results), 1),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }
