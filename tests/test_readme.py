"""The README's commands and code, as a new user runs them on CPU: the demo (and its rerun), the server with the
Python client and curl, the Python API. Each is read out of README.md, so the page cannot drift from what runs."""

import re
import shlex
import subprocess
import sys

from tests.conftest import ROOT, read_records
from tests.serving import free_port, stop_server, wait_until

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def command(text: str, starts: str) -> list[str]:
    """The indented shell command in `text` that starts with `starts`, its continuation lines joined."""
    block = re.search(rf"^    ({re.escape(starts)}.*?)(?:\n\n|\Z)", text, re.S | re.M).group(1)
    return shlex.split(block.replace("\\\n", " "))


def python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", *args[1:]] if args[0] == "torchrun" else args
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def test_the_demo_runs_as_written_and_its_rerun_has_nothing_to_do(tmp_path):
    demo = command(section("Run the demo"), "torchrun") + [f"data.output={tmp_path}/demo.jsonl"]  # the last wins
    first = run(demo)
    assert first.returncode == 0, first.stderr
    lines = (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    records = read_records(tmp_path / "demo.jsonl")
    assert len(records) == len([line for line in lines if line.strip()]) and all("error" in r for r in records)
    assert (tmp_path / "demo.jsonl.metrics.json").exists() and (tmp_path / "demo.jsonl.config.yaml").exists()
    again = run(demo)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr


def test_the_server_answers_the_readmes_client_and_curl(tmp_path):
    text = section("Serve it")
    port = free_port()
    serve = command(text, "torchrun") + [f"server.port={port}"]
    args = [sys.executable, "-m", "torch.distributed.run", *serve[1:]]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: run(["curl", "-sf", f"{url}/health"]).returncode == 0, "the server to come up", 300)
        client = python_block(text).replace("http://127.0.0.1:8000", url)
        reply = run([sys.executable, "-c", client])
        assert reply.returncode == 0 and "Choice(" in reply.stdout, reply.stderr
        curl = run([a.replace("http://127.0.0.1:8000", url) for a in command(text, "curl")])
        assert curl.returncode == 0 and '"choices"' in curl.stdout, curl.stdout + curl.stderr
    finally:
        stop_server(proc)


def test_the_python_api_example_runs_as_written():
    example = python_block(section("The jobs").split("### From Python", 1)[1])
    out = run([sys.executable, "-c", example])
    assert out.returncode == 0 and out.stdout.split()[0] in ("stop", "length", "tool_call", "error"), (
        out.stdout + out.stderr
    )
