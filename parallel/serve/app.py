"""The server's ASGI application (Starlette), run by uvicorn on its own event loop in the API process.

Every request passes `Gate` first: its key, its body's size, then its body read whole (within the limit) before
any route sees it; a refusal that comes before the body is read leaves uvicorn to read and drop the rest, so a
kept-alive connection is never left mid-body and a body too large costs nothing. Then the routes: /health,
/v1/models, and the generating APIs, whose requests are prepared (prepare.py), handed to the server's tickets
(tickets.py), and answered by `Generation` as their tokens arrive. Nothing here blocks the loop: a
ticket's tokens arrive on an asyncio queue, big prompts are prepared in worker processes, and calls into the
tickets (which may wait on a replica's socket) run on a thread of their own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from openai_harmony import HarmonyEncoding
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from parallel.engine.interface import Sampling, Work
from parallel.log import error
from parallel.serve.metrics import Metrics, RequestClock
from parallel.serve.openai_api import ApiError
from parallel.serve.prepare import Prepared, Preparer, Settings
from parallel.serve.replies import Reply, make_reply
from parallel.serve.tickets import Ticket, Tickets

# The finish reason of requests that server.drain_timeout_s cut: answered as a 503 or a failed stream.
DRAIN_CUT = "error: the server shut down before the request finished (server.drain_timeout_s)"
OPEN_PATHS = ("/health", "/metrics")  # answered without the key


def json_response(status: int, body: dict) -> Response:
    # ASCII JSON: an echoed string with a lone surrogate would not encode as UTF-8.
    return Response(json.dumps(body), status, media_type="application/json")


def error_response(e: ApiError) -> Response:
    return json_response(e.status, e.body())


class Gate:
    """ASGI middleware: what a request may cost before the routes see it. A wrong key or a body over the limit
    (by its Content-Length, or a chunked body once it passes the limit) is answered before the body is read, or
    read further; uvicorn then reads and drops what is left of it as it comes (within server.request_timeout_s),
    so the connection stays usable and the client, still sending, is not reset before it reads the answer."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(dict(scope["headers"]), scope["path"])
            body = await self._read(receive)
        except ApiError as e:
            return await error_response(e)(scope, receive, send)
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)

    def _check(self, headers: dict[bytes, bytes], path: str) -> None:
        """The key, and the size the body says it has (uvicorn lower-cases names; h11 has checked the length)."""
        key = headers.get(b"authorization", b"")
        if self.expected and path not in OPEN_PATHS and not hmac.compare_digest(key, self.expected):
            raise ApiError(
                401, "Incorrect or missing API key: send Authorization: Bearer <key>", code="invalid_api_key"
            )
        if int(headers.get(b"content-length", 0)) > self.max_body_bytes:
            raise self._too_large()

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than server.max_body_bytes={self.max_body_bytes}",
            code="request_too_large",
        )

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client went away; ApiError (413) once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise self._too_large()
            if not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the routes: the body already read, then the connection's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def again():
        return pending.pop() if pending else await receive()

    return again


class Api:
    """The routes, and what they share: the tickets (from `start`), the draining flag, the preparer."""

    def __init__(self, settings: Settings, enc: HarmonyEncoding, api_key: str | None, max_body_bytes: int):
        self.settings, self.enc = settings, enc
        self.preparer = Preparer(settings)
        self.tickets: Tickets | None = None
        self.draining = False
        self.calls = ThreadPoolExecutor(1, thread_name_prefix="tickets")  # one thread: submits and cancels in order
        self.metrics = Metrics(lambda: self.tickets.dispatcher.per_replica())
        routes = [Route("/health", self.health), Route("/metrics", self.exposition), Route("/v1/models", self.models)]
        routes += [
            Route(path, self._generate_endpoint(api), methods=["POST"])
            for path, api in (
                ("/v1/chat/completions", "chat"),
                ("/v1/responses", "responses"),
                ("/v1/completions", "completions"),
            )
        ]
        starlette = Starlette(routes=routes, exception_handlers={HTTPException: self._no_route})
        self.asgi = Gate(starlette, api_key, max_body_bytes)

    async def health(self, request: Request) -> Response:
        # The tickets's counters sit behind the dispatcher's lock, which a send to a busy replica may hold.
        status = await asyncio.get_running_loop().run_in_executor(None, self.tickets.status)
        # CPU seconds so far of this thread (the HTTP loop: parsing, replies, streaming) and of the whole API
        # process (the dispatcher and the replicas' links too): a rate near a full core says the server's Python,
        # not the engine, bounds it.
        cpu = {"http_cpu_s": round(time.thread_time(), 3), "process_cpu_s": round(time.process_time(), 3)}
        body = {"status": "draining" if self.draining else "ok", "model": self.settings.model_name, **status, **cpu}
        return json_response(503 if self.draining else 200, body)

    async def exposition(self, request: Request) -> Response:
        # Read off the event loop: the replicas' counts sit behind the dispatcher's lock.
        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.exposition)
        return Response(body, 200, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        model = {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "gpt-oss-launch"}
        return json_response(200, {"object": "list", "data": [model]})

    async def _no_route(self, request: Request, e: HTTPException) -> Response:
        return error_response(ApiError(e.status_code, f"no route {request.method} {request.url.path}"))

    def _generate_endpoint(self, api: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            clock = RequestClock(self.metrics, api)
            try:
                return await self._generate(api, await request.body(), clock)
            except ApiError as e:
                clock.end("refused" if e.status < 500 else "failed")
                return error_response(e)
            except Exception as e:  # noqa: BLE001 - a bug costs this request, not the server
                error(f"POST {request.url.path} failed: {type(e).__name__}: {e}")
                clock.end("failed")
                return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

        return endpoint

    def _open(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="server_shutting_down")

    async def _generate(self, api: str, body: bytes, clock: RequestClock) -> Response:
        self._open()
        prepared = await self.preparer(api, body)
        clock.prompt_tokens = len(prepared.prompt)
        self._open()  # preparing a big prompt takes a while: the drain may have begun
        loop = asyncio.get_running_loop()
        ticket = Ticket(self._work(prepared), loop)
        reply = make_reply(
            api,
            self.enc,
            self.settings.model_name,
            len(prepared.prompt),
            prepared.max_new_tokens,
            prepared.options.include_usage,
        )
        await loop.run_in_executor(self.calls, self.tickets.submit, ticket)
        return Generation(
            ticket, reply, prepared.options.stream, lambda: self.calls.submit(self.tickets.cancel, ticket), clock
        )

    def _work(self, prepared: Prepared) -> Work:
        rid, options, gen = self.tickets.next_id(), prepared.options, self.settings.generation
        sampling = Sampling(
            temperature=gen.temperature if options.temperature is None else options.temperature,
            top_p=gen.top_p if options.top_p is None else options.top_p,
            seed=gen.seed + rid if options.seed is None else options.seed,
            ignore_eos=options.ignore_eos,
        )
        return Work(rid, prepared.prompt, prepared.max_new_tokens, sampling)


def failure(reason: str) -> ApiError:
    """A finish reason that is not an answer, as the error the client gets."""
    if reason == DRAIN_CUT:
        return ApiError(503, reason.removeprefix("error: "), code="server_shutting_down")
    return ApiError(500, f"generation failed: {reason}")


class Generation:
    """An ASGI response: a request's reply, streamed as server-sent events or whole, as its tokens arrive. A
    client that goes away, at any point, cancels the request (its row ends at the replica's next step)."""

    def __init__(self, ticket: Ticket, reply: Reply, stream: bool, cancel: Callable[[], object], clock: RequestClock):
        self.ticket, self.reply, self.stream, self.cancel, self.clock = ticket, reply, stream, cancel, clock
        self.ended = False  # the ticket's finish reason arrived: nothing left to cancel
        self.outcome = "cancelled"  # until it ends otherwise: the client left

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        respond = self._stream(send) if self.stream else self._whole(scope, receive, send)
        try:
            await _unless_disconnected(receive, respond)
        finally:
            if not self.ended:
                self.cancel()
            self.clock.end(self.outcome)

    async def _chunks(self) -> AsyncIterator[list[dict]]:
        """The reply's chunks, one list per arrival of tokens; ApiError if the request failed."""
        yield list(self.reply.start())
        while isinstance(item := await self.ticket.queue.get(), list):
            self.clock.tokens(len(item))
            yield list(self.reply.tokens(item))
        self.ended = True
        if item not in ("stop", "tool_call", "length"):
            self.outcome = "failed"
            raise failure(item)
        self.outcome = item
        yield list(self.reply.end(item))

    async def _stream(self, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            async for chunks in self._chunks():
                if chunks:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"".join(map(self.reply.frame, chunks)),
                            "more_body": True,
                        }
                    )
            last = self.reply.done
        except ApiError as e:
            last = self.reply.frame(self.reply.failure(e))
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _whole(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async for _ in self._chunks():
                pass
            response = json_response(200, self.reply.result())
        except ApiError as e:
            response = error_response(e)
        await response(scope, receive, send)


async def _unless_disconnected(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work` unless the client disconnects first (then `work` is cancelled)."""

    async def disconnected():
        while (await receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(disconnected())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    if tasks[0].done() and not tasks[0].cancelled():
        tasks[0].result()
