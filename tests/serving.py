"""Starting and stopping launch/serve.py as users do (torchrun), for the server's tests."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT

KEY = "sesame"


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where gloo's and the OS's own picks never land
    between this check and the server's bind."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def serve_command(model, *overrides) -> list[str]:
    """launch/serve.py on the tiny config and `model`, as users start it (after torchrun or python)."""
    return [
        str(ROOT / "launch" / "serve.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"model.path={model}",
        *overrides,
    ]


def start_server(model, *overrides, nproc=2, env=None):
    port = free_port()
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd = [*runner, *serve_command(model, f"server.port={port}", "generation.max_new_tokens=64", *overrides)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"server did not come up:\n{proc.communicate()[0]}")


def stop_server(proc) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def wait_until(condition, what: str, timeout: float = 60):
    """`condition()`'s first true value, polled until `timeout`: a test fails saying what never came, never hangs."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)
    return value


def health(url) -> dict:
    """/health's body, also while draining (503)."""
    try:
        return json.load(urllib.request.urlopen(f"{url}/health"))
    except urllib.error.HTTPError as e:
        return json.load(e)


def post(url, path, body: bytes, key=KEY) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}{path}", data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
