"""Rank 0's HTTP server: OpenAI's Chat Completions and Responses APIs, run through the batcher.

The standard library's threading HTTP server: one thread per connection, each waiting on its job's tokens
while the replicas generate. Errors are OpenAI error bodies for that request only; the server keeps serving.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from openai_harmony import HarmonyEncoding

from parallel.config import JobConfig
from parallel.engine.interface import Sampling, Work
from parallel.log import error, log
from parallel.protocol.harmony import HarmonyStream
from parallel.protocol.prompts import PromptError, prepare
from parallel.serve.batcher import Batcher, Ticket
from parallel.serve.openai_api import (
    ApiError,
    Call,
    ChatReply,
    ResponsesReply,
    chat_call,
    responses_call,
)

API_KEY_ENV = "GPT_OSS_API_KEY"
CLIENT_CHECK_S = 0.25


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The standard library's backlog of 5 resets clients that connect together (a pool of 32 workers does).
    request_queue_size = 1024

    def __init__(self, cfg: JobConfig, enc: HarmonyEncoding, context_length: int):
        super().__init__((cfg.server.host, cfg.server.port), Handler)
        self.model_name = cfg.server.model_name or cfg.model.path
        self.api_key = cfg.server.api_key or os.environ.get(API_KEY_ENV)
        self.enc, self.gen, self.context_length = enc, cfg.generation, context_length
        self.drain_timeout_s = cfg.server.drain_timeout_s
        self.batcher: Batcher | None = None
        self.started = self.draining = False

    def start(self, batcher: Batcher) -> None:
        self.batcher, self.started = batcher, True
        threading.Thread(target=self.serve_forever, daemon=True, name="http").start()
        host, port = self.server_address[:2]
        log(f"serving {self.model_name!r} at http://{host}:{port}/v1 (api key {'required' if self.api_key else 'not required'})")

    def drain(self) -> None:
        """SIGTERM: refuse new requests, let those in flight finish (within drain_timeout_s), end the replicas."""
        self.draining = True
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + self.drain_timeout_s
        while self.batcher.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = self.batcher.cut_all("error: the server shut down (server.drain_timeout_s) before the request finished")
        if cut:
            error(f"drain timeout: {cut} unfinished requests cut")
        self.batcher.dispatcher.close()
        log("drained: every request answered or cut; stopping")

    def ticket(self, call: Call) -> Ticket:
        """The request as prompt tokens with its budget, checked against the context, ready for the batcher."""
        call.request.max_new_tokens = call.max_tokens
        try:
            prompt = prepare(self.enc, call.request, self.gen, self.context_length)
        except PromptError as e:
            raise ApiError(400, str(e), e.param, e.code) from None
        rid = self.batcher.next_id()
        sampling = Sampling(
            temperature=self.gen.temperature if call.temperature is None else call.temperature,
            top_p=self.gen.top_p if call.top_p is None else call.top_p,
            seed=self.gen.seed + rid,
            ignore_eos=call.ignore_eos,
        )
        return Ticket(Work(rid, prompt.tokens, prompt.max_new_tokens, sampling))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per request would drown the job's log

    def do_GET(self) -> None:
        if self.path == "/health":
            state = "draining" if self.server.draining else "ok"
            return self._json(200, {"status": state, "model": self.server.model_name, **self.server.batcher.status()})
        self._handle(lambda: self._models() if self.path == "/v1/models" else self._no_route())

    def do_POST(self) -> None:
        routes = {"/v1/chat/completions": (chat_call, self._chat_reply), "/v1/responses": (responses_call, self._responses_reply)}
        if self.path not in routes:
            return self._handle(self._no_route)
        parse, reply = routes[self.path]
        self._handle(lambda: self._complete(parse(self._body(), self.server.model_name), reply))

    def _handle(self, action) -> None:
        try:
            self._authorize()
            action()
        except ApiError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug costs this request, not the server
            error(f"{self.command} {self.path} failed: {type(e).__name__}: {e}")
            self._json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body())

    def _authorize(self) -> None:
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>", code="invalid_api_key")

    def _no_route(self) -> None:
        raise ApiError(404, f"no route {self.command} {self.path}")

    def _models(self) -> None:
        model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "gpt-oss-launch"}
        self._json(200, {"object": "list", "data": [model]})

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _chat_reply(self, call: Call, work: Work) -> ChatReply:
        return ChatReply(self.server.model_name, len(work.prompt), call.include_usage)

    def _responses_reply(self, call: Call, work: Work) -> ResponsesReply:
        return ResponsesReply(self.server.model_name, len(work.prompt), work.max_new_tokens)

    def _complete(self, call: Call, make_reply) -> None:
        if self.server.draining:
            raise ApiError(503, "the server is shutting down")
        ticket = self.server.ticket(call)
        reply = make_reply(call, ticket.work)
        bare = isinstance(reply, ChatReply)
        self.checked = time.monotonic()
        try:
            self.server.batcher.submit(ticket)
            if call.stream:
                self._start_stream()
                self._send(reply.start(), bare)
            stream, count = HarmonyStream(self.server.enc), 0
            while isinstance(event := self._next_event(ticket), list):
                for token in event:
                    count += 1
                    for harmony_event in stream.feed(token):
                        chunks = reply.on(harmony_event)
                        if call.stream:
                            self._send(chunks, bare)
                        else:
                            list(chunks)
            if event.startswith("error"):
                failure = ApiError(500, f"generation failed: {event}")
                if not call.stream:
                    raise failure
                final = [failure.body() | ({} if bare else {"type": "error"})]
            else:
                final = reply.finish(event, stream.finish(event in ("stop", "tool_call")), count)
            if call.stream:
                self._send(final, bare)
                if bare:
                    self.wfile.write(b"data: [DONE]\n\n")
            else:
                list(final)
                self._json(200, reply.result())
        except (BrokenPipeError, ConnectionResetError):  # the client went away: free its row
            self.server.batcher.cancel(ticket)

    def _next_event(self, ticket: Ticket) -> list[int] | str:
        """The request's next tokens or finish reason. Looks at the connection every CLIENT_CHECK_S, so that a client
        that went away is noticed even when nothing is written to it (a non-streamed request, or output that
        parses to no delta)."""
        while True:
            if time.monotonic() - self.checked > CLIENT_CHECK_S:
                self.checked = time.monotonic()
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    raise ConnectionResetError("the client closed the connection")
            try:
                return ticket.queue.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                pass

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

    def _send(self, chunks, bare: bool) -> None:
        """Chat Completions streams bare `data:` lines; the Responses API names each event too."""
        for chunk in chunks:
            head = b"" if bare else f"event: {chunk['type']}\n".encode()
            self.wfile.write(head + b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
