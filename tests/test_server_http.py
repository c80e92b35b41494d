"""launch/serve.py's HTTP edge on raw sockets, where a client library would hide the case: body limits, malformed
and hostile requests, keep-alive after errors, slow clients, big requests, disconnects. Each must cost only its
own request. One rank through the engine, with small limits so the cases are quick to reach."""

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client

import pytest

from parallel.replicas.channel import Hub, listen
from parallel.serve.http import API_KEY_ENV, MAX_HEAD_BYTES
from tests.serving import KEY, health, serve_command, start_server, stop_server, wait_until
from tests.taught import GREETING, HELLO

LIMIT = 1_000_000
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def server(taught_model):
    proc, url = start_server(
        taught_model,
        "engine.mode=always",
        f"server.max_body_bytes={LIMIT}",
        f"server.request_timeout_s={TIMEOUT_S}",
        f"server.api_key={KEY}",
        nproc=1,
    )
    yield url, str(taught_model)
    stop_server(proc)


def connect(url: str, timeout: float = 60) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def request(method: str, path: str, body: bytes | None = b"", key: str = KEY, headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n{headers}"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def response(sock: socket.socket) -> tuple[int, dict | bytes]:
    """One response from the connection; the body as JSON where it is JSON."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    body = r.read()
    return r.status, json.loads(body) if r.getheader("content-type") == "application/json" else body


def exchange(sock: socket.socket, data: bytes) -> tuple[int, dict | bytes]:
    sock.sendall(data)
    return response(sock)


def chat(model: str, **extra) -> bytes:
    return json.dumps({"model": model, "messages": HELLO, "max_tokens": 20, **extra}).encode()


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server):
    url, model = server
    with connect(url, timeout=10) as sock:  # no body follows: a server that waits for it times this out
        status, reply = exchange(
            sock, request("POST", "/v1/chat/completions", None, headers="Content-Length: 50000000\r\n")
        )
    assert status == 413 and "server.max_body_bytes" in reply["error"]["message"]


def test_a_chunked_body_is_cut_at_the_limit(server):
    url, model = server
    chunk = b"x" * (LIMIT + 1)
    with connect(url, timeout=10) as sock:  # the chunked body never ends: only the limit answers it
        status, reply = exchange(
            sock,
            request("POST", "/v1/chat/completions", None, headers="Transfer-Encoding: chunked\r\n")
            + b"%x\r\n" % len(chunk)
            + chunk
            + b"\r\n",
        )
    assert status == 413


@pytest.mark.parametrize(
    "method, path, key, status",
    [
        ("POST", "/v1/nothing", KEY, 404),
        ("POST", "/v1/chat/completions", "wrong", 401),
        ("GET", "/v1/chat/completions", KEY, 405),
    ],
)
def test_an_error_reply_leaves_the_connection_usable(server, method, path, key, status):
    url, model = server
    with connect(url) as sock:
        first = exchange(sock, request(method, path, chat(model), key=key))
        second = exchange(sock, request("GET", "/v1/models"))
    assert first[0] == status and "error" in first[1]
    assert second == (
        200,
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "gpt-oss-launch"}]},
    )


@pytest.mark.parametrize("length", ["abc", "-1", "1 2"])
def test_a_malformed_content_length_is_400(server, length):
    url, model = server
    with connect(url, timeout=10) as sock:
        status, _ = exchange(
            sock, request("POST", "/v1/chat/completions", None, headers=f"Content-Length: {length}\r\n")
        )
        assert status == 400 and closed(sock)


def padded_head(size: int) -> bytes:
    """A GET /v1/models head (request line, headers, blank line) of exactly `size` bytes, padded by a header."""
    bare = request("GET", "/v1/models", None, headers="X-Pad: \r\n")
    return request("GET", "/v1/models", None, headers=f"X-Pad: {'a' * (size - len(bare))}\r\n")


def send_in_pieces(sock: socket.socket, data: bytes, piece: int = 1000) -> None:
    """Each piece in a read of its own, as a slow client's head arrives; until the server closes the connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for start in range(0, len(data), piece):
        try:
            sock.sendall(data[start : start + piece])
        except (BrokenPipeError, ConnectionResetError):  # refused and closed: its answer is there to read
            return
        time.sleep(0.02)


class Replies:
    """A connection's replies read through one buffered reader, for `response`: pipelined replies arrive together,
    and http.client's reader of each reply's own would drop the bytes of the next one that it read ahead."""

    def __init__(self, sock: socket.socket):
        self.file = sock.makefile("rb")

    def makefile(self, mode: str) -> "Replies":
        return self

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def close(self) -> None:  # http.client closes its reader after each reply: the next reply reads on
        pass


@pytest.mark.parametrize("size", [MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1, 50_000])
@pytest.mark.parametrize("arrival", ["one read", "in pieces", "pipelined"])
def test_a_request_head_over_the_limit_is_400_however_it_arrives(server, size, arrival):
    """h11 bounds only a head still incomplete: one that came whole in a single read, or pipelined behind another
    request, was served at any size. Now one byte over MAX_HEAD_BYTES is a 400 saying so, and the connection closes;
    a head of exactly the limit is served."""
    url, model = server
    head = padded_head(size)
    assert len(head) == size
    with connect(url, timeout=10) as sock:
        replies = Replies(sock)
        if arrival == "one read":
            sock.sendall(head)
        elif arrival == "in pieces":
            send_in_pieces(sock, head)
        else:  # behind a small request, in the same read: parsed when the first one's reply is done
            sock.sendall(request("GET", "/v1/models", None) + head)
            assert response(replies)[0] == 200
        status, reply = response(replies)
        if size <= MAX_HEAD_BYTES:
            assert status == 200 and reply["data"][0]["id"] == model
            sock.sendall(request("GET", "/v1/models", None))
            assert response(replies)[0] == 200  # and the connection is kept alive
        else:
            says = f"request head (request line and headers) is larger than {MAX_HEAD_BYTES} bytes"
            assert status == 400 and says in reply.decode(), reply
            assert closed(sock)


@pytest.mark.parametrize(
    "body, says",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (
            chat("{model}", messages=[{"role": "system", "content": "a" * 5000}, *HELLO]),
            "the instructions (system and developer messages): a run of over 512 characters",
        ),
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        (b'{"model": "\\udc00", "messages": []}', "does not exist"),
        (b'{"model": "{model}", "messages": [{"role": "user", "content": "\\ud800"}]}', "cannot render"),
        (
            b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
            "seed",
        ),
        (b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', "max_tokens"),
        (b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        (
            b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
            + b"9" * 5000
            + b"}",
            "not valid JSON",
        ),
    ],
    ids=[
        "nested",
        "run",
        "array",
        "null",
        "empty",
        "not-utf8",
        "surrogate-model",
        "surrogate-text",
        "seed-2**64",
        "max_tokens-inf",
        "temperature-nan",
        "5000-digits",
    ],
)
def test_a_body_that_is_no_request_is_refused(server, body, says):
    url, model = server
    with connect(url) as sock:
        status, reply = exchange(
            sock,
            request(
                "POST",
                "/v1/chat/completions",
                body.replace(b"{model}", model.encode()),
                headers="Content-Type: text/plain\r\n",
            ),
        )
    assert status in (400, 404) and says in reply["error"]["message"], reply


def test_query_strings_are_ignored_and_a_null_n_is_taken(server):
    url, model = server
    with connect(url) as sock:
        assert exchange(sock, request("GET", "/v1/models?limit=5"))[0] == 200
        status, reply = exchange(sock, request("POST", "/v1/chat/completions?api-version=1", chat(model, n=None)))
    assert status == 200 and reply["choices"][0]["message"]["content"] == GREETING


def test_a_client_that_trickles_its_request_is_disconnected(server):
    url, model = server
    start = time.monotonic()
    with connect(url, timeout=TIMEOUT_S * 5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n")
        try:
            for byte in b"Authorization: Bearer " + KEY.encode():
                sock.sendall(bytes([byte]))
                time.sleep(0.25)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed(sock) and TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S * 4


@pytest.mark.parametrize("unit", ["a", "!", " ", "a\u0301"], ids=["letters", "punctuation", "whitespace", "marks"])
def test_big_requests_cost_only_themselves(server, unit):
    """A 50 MB body, and two bodies that are one run of 500,000 characters each (a minute or more of o200k's
    tokenizer were it given them whole), one of them dropped at once: an ordinary 7 KB chat request is answered
    within seconds."""
    url, model = server
    done = {}

    def send(name, data, drop):
        with connect(url) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):  # answered and cut off while still sending
                pass
            if not drop:
                done[name] = response(sock)[0]

    # Under what the tiny model's context could hold (4096 tokens of at most 128 bytes), so it is tokenized.
    run = unit * (500_000 // len(unit))
    # Its budget cannot fit beside it, which is found once it is tokenized: none runs, to keep the engine free.
    big = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": run}], "max_tokens": 4000}, ensure_ascii=False
    ).encode()
    assert len(big) < LIMIT
    senders = [
        threading.Thread(target=send, args=item)
        for item in (
            ("huge", request("POST", "/v1/chat/completions", b" " * 50_000_000), False),
            ("big", request("POST", "/v1/chat/completions", big), False),
            ("dropped", request("POST", "/v1/chat/completions", big), True),
        )
    ]
    ordinary = [
        {
            "role": "user",
            "content": " ".join(random.Random(0).choices(["cat", "dog", "sat", "on", "the", "mat"], k=1700)),
        }
    ]
    with connect(url) as sock:  # once before, so that its prefill (seconds on CPU) is in the prefix cache
        assert (
            exchange(sock, request("POST", "/v1/chat/completions", chat(model, messages=ordinary, max_tokens=1)))[0]
            == 200
        )
    for sender in senders:
        sender.start()
    time.sleep(0.5)
    start = time.monotonic()
    with connect(url) as sock:
        status, reply = exchange(
            sock, request("POST", "/v1/chat/completions", chat(model, messages=ordinary, max_tokens=1))
        )
    answered = time.monotonic() - start
    for sender in senders:
        sender.join(timeout=120)
    assert status == 200 and reply["usage"]["completion_tokens"] == 1 and reply["usage"]["prompt_tokens"] > 1700
    assert answered < 2, answered
    assert done == {"huge": 413, "big": 400}


def test_many_clients_that_disconnect_free_their_rows(server):
    url, model = server
    socks = []
    for i in range(16):
        sock = connect(url)
        sock.sendall(
            request("POST", "/v1/chat/completions", chat(model, max_tokens=3000, stream=i % 2 == 0, ignore_eos=True))
        )
        socks.append(sock)
    wait_until(lambda: health(url)["running_batches"], "the requests to start generating")
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 30
    while (h := health(url))["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h["requests_in_flight"] == 0 and h["running_batches"] == 0, h
    with connect(url) as sock:
        assert (
            exchange(sock, request("POST", "/v1/chat/completions", chat(model)))[1]["choices"][0]["message"]["content"]
            == GREETING
        )


def test_an_empty_api_key_refuses_to_serve_rather_than_serve_open(taught_model):
    """`export GPT_OSS_API_KEY=$KEY` with KEY unset sets the variable empty: that must not open the server to all."""
    cmd = [sys.executable, *serve_command(taught_model, "server.port=1")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, API_KEY_ENV: ""})
    assert run.returncode == 2 and "set but empty" in run.stderr, run.stderr


def test_a_port_in_use_fails_before_the_model_loads(taught_model):
    """Another program holds the port: the server says so at once and exits, before loading a weight."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cmd = [sys.executable, *serve_command(taught_model, f"server.port={port}")]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in run.stderr, run.stderr
    assert "loading" not in run.stderr.lower(), run.stderr


def test_a_stray_connection_to_the_hub_costs_only_itself():
    """Something without the job's key connects to the hub's port while it waits for the replicas' leaders (a port
    scanner, a client that got the wrong port): it is dropped, and the leader that follows still links."""
    listener, key = listen()
    hub = Hub()
    waiting = threading.Thread(target=hub.take, args=(listener, 1))
    waiting.start()
    with socket.create_connection(listener.address) as stray:
        stray.sendall(b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(1)
        assert waiting.is_alive()  # still waiting for its leader
        leader = Client(listener.address, authkey=key)
        leader.send(0)
        waiting.join(timeout=30)
    assert not waiting.is_alive() and list(hub.connections) == [0]
    leader.send(("want", 4))
    assert hub.inbox.get(timeout=10) == (0, ("want", 4))
    leader.close()
    listener.close()
