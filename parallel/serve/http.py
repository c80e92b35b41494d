"""The server's HTTP: uvicorn (HTTP/1.1 through h11) running the ASGI app of app.py on its own event loop, in a
thread of the server's API process (api_process.py).

The socket is bound before the model loads (a port in use fails at once, not after the weights), and handed to
uvicorn once the tickets exists. h11 parses strictly (a malformed Content-Length is a 400 and a closed
connection); the protocol below bounds each request's head (MAX_HEAD_BYTES, however it arrives) and adds a deadline
for each request to arrive whole; the app's gate bounds bodies. A drain (SIGTERM, through rank 0) refuses new
requests with 503 while those in flight get server.drain_timeout_s to finish; whatever is left is cut and told so;
then uvicorn stops.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import threading
import time
from collections.abc import Callable

import h11
import uvicorn
from openai_harmony import HarmonyEncoding
from uvicorn.protocols.http.h11_impl import H11Protocol

from parallel.config import JobConfig
from parallel.log import error, log
from parallel.serve.app import DRAIN_CUT, Api
from parallel.serve.prepare import Settings
from parallel.serve.tickets import Tickets

API_KEY_ENV = "GPT_OSS_API_KEY"
# After the drain, how long uvicorn waits for replies still being written (to a client that reads slowly).
SHUTDOWN_GRACE_S = 3
# The largest request head (request line and headers, through the blank line that ends them) served; a larger one
# is a 400 and a closed connection. h11's default bound, which it applies only to a head still incomplete.
MAX_HEAD_BYTES = 16 * 1024
# Where h11 finds a head's end: its first empty line, CRLF or bare LF (h11's ReceiveBuffer).
HEAD_END = re.compile(rb"\n\r?\n")


class BoundedHeads(h11.Connection):
    """h11's server connection, refusing a request head over `max_head_bytes` however it arrives. h11's own bound
    (max_incomplete_event_size) only refuses a head still incomplete: a complete one that comes in a single read, or
    pipelined behind another request, passes whatever its size. So before each event of a new request, the head
    waiting in the buffer is measured: it is too long if its end is past the limit or, not there yet, the buffer
    already is."""

    def __init__(self, max_head_bytes: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.refusal: str | None = None  # why the head was refused, for the 400's body

    def next_event(self):
        if self.their_state is h11.IDLE:  # what is buffered, if anything, starts a request's head
            buffered = self.trailing_data[0]  # a copy: at most the head and one read's worth of body
            end = HEAD_END.search(buffered, 0, self.max_head_bytes + 1)
            if (end.end() if end else len(buffered)) > self.max_head_bytes:
                self.refusal = f"the request head (request line and headers) is larger than {self.max_head_bytes} bytes"
                raise h11.RemoteProtocolError(self.refusal)  # uvicorn answers it with a 400 and closes
        return super().next_event()


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline: a request's head and body must arrive within `timeout_s` of the
    connection opening or its previous reply ending. A client that trickles them (slowloris) is disconnected
    instead of holding a connection forever; uvicorn's own keep-alive timer only covers a silent one. Heads are
    bounded by BoundedHeads."""

    def __init__(self, *args, timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = BoundedHeads(MAX_HEAD_BYTES)  # in place of uvicorn's, before any byte arrives
        self.timeout_s = timeout_s
        self.deadline: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every RemoteProtocolError with the same "Invalid HTTP request received."; an oversized head
        # says what was wrong with it.
        super().send_400_response(self.conn.refusal or msg)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is in, whole
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # the next request is not in yet
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.timeout_s, self.transport.close)

    def _disarm(self) -> None:
        if self.deadline:
            self.deadline.cancel()
            self.deadline = None


class Server:
    def __init__(
        self, cfg: JobConfig, enc: HarmonyEncoding, context_length: int, vocab_size: int, on_stop: Callable[[], None]
    ):
        """on_stop: called should uvicorn stop on its own (not drained): the job should then end."""
        server = cfg.server
        key = server.api_key if server.api_key is not None else os.environ.get(API_KEY_ENV)
        if key is not None and not key.strip():
            # `export GPT_OSS_API_KEY=$KEY` with KEY unset must not serve without a key.
            raise ValueError(
                f"the API key (server.api_key or {API_KEY_ENV}) is set but empty: give a key, or unset it "
                "to serve without one"
            )
        self.socket = _bind(server.host, server.port)  # OSError: the caller says why and exits
        model_name = server.model_name or cfg.model.path
        self.api = Api(
            Settings(model_name, cfg.generation, context_length, vocab_size), enc, key, server.max_body_bytes
        )
        self.protocol = functools.partial(DeadlineProtocol, timeout_s=server.request_timeout_s)
        self.drain_timeout_s = server.drain_timeout_s
        self.on_stop = on_stop

    def start(self, tickets: Tickets) -> None:
        self.api.tickets = tickets
        # No access log (a line a request would drown the job's log) and no lifespan; uvicorn's own errors still
        # reach stderr. Off the main thread, uvicorn installs no signal handlers: SIGTERM is rank 0's (api_process.py).
        config = uvicorn.Config(
            self.api.asgi,
            http=self.protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="error",
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, daemon=True, name="http")
        self.thread.start()
        host, port = self.socket.getsockname()[:2]
        key = "required" if self.api.asgi.expected else "not required"
        log(f"serving {self.api.settings.model_name!r} at http://{host}:{port}/v1 (api key {key})")

    def _serve(self) -> None:
        try:
            asyncio.run(self.uvicorn.serve(sockets=[self.socket]))
        except BaseException as e:  # noqa: BLE001 - SystemExit too: how uvicorn says it cannot start
            error(f"the HTTP server failed: {type(e).__name__}: {e}")
        if not self.api.draining:  # it stopped on its own
            self.on_stop()

    def drain(self) -> None:
        """Refuse new requests (503; /health says draining), let those in flight finish within
        drain_timeout_s, cut the rest (each client is told), stop serving, end the replicas."""
        self.api.draining = True
        tickets = self.api.tickets
        deadline = time.monotonic() + self.drain_timeout_s
        while tickets.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = tickets.cut_all(DRAIN_CUT)
        if cut:
            error(f"drain timeout: {cut} unfinished requests cut")
        self.uvicorn.should_exit = True
        self.thread.join()
        self.api.preparer.close()
        tickets.dispatcher.close()
        log("drained: every request answered or cut; stopping")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6). Connections wait in its backlog until uvicorn serves."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
