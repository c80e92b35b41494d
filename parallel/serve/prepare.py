"""A request body becomes what a replica runs: JSON, the API's checks, the prompt's tokens (a conversation
rendered with harmony, a text encoded as o200k, or token ids as given) and its budget within the context.

Small bodies are prepared on the event loop. Larger ones go to worker processes: harmony renders and encodes
while holding the GIL, a few MB of prompt for seconds, and no other request of the server's API process
could move meanwhile; in a worker, a big prompt costs its own request only. Whatever a body holds, encoding
costs about a microsecond a byte at worst (parallel/protocol/tokenize.py), and bodies up to SMALL_BYTES have a
worker of their own, so a small request waits for no large one.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import select
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from parallel.config import GenerationConfig
from parallel.log import error
from parallel.protocol.harmony import encoding
from parallel.protocol.prompts import PromptError, fit
from parallel.protocol.prompts import prepare as prepare_conversation
from parallel.protocol.requests import json_problem
from parallel.protocol.tokenize import encode_text
from parallel.serve.openai_api import ApiError, Call, Options, chat_call, completion_call, responses_call

# Bodies up to this size render in a few ms, whatever they hold: not worth a trip to a worker.
INLINE_BYTES = 4 * 2**10
# Bodies up to this size (under 0.1 s to prepare at worst) go to their own worker; larger ones to WORKERS others.
SMALL_BYTES = 64 * 2**10
WORKERS = 2
# OpenAI's and vLLM's default for the legacy Completions API (the others default to generation.max_new_tokens).
COMPLETION_MAX_TOKENS = 16
CALLS = {"chat": chat_call, "responses": responses_call, "completions": completion_call}


@dataclass(frozen=True)
class Settings:
    """What preparing a request needs to know of the server."""

    model_name: str
    generation: GenerationConfig
    context: int  # the model's context length
    vocab: int  # the model's vocabulary size: token ids in a prompt must be below it


@dataclass
class Prepared:
    api: str  # chat, responses, completions
    options: Options
    prompt: list[int]
    max_new_tokens: int


def prepare(api: str, body: bytes, settings: Settings) -> Prepared:
    """The body of a request to `api`, ready to run; ApiError (400) saying what is wrong with it."""
    obj = parse_json(body)
    call = CALLS[api](obj, settings.model_name)
    try:
        prompt = _conversation(call, settings) if call.request else _raw(call, settings)
    except PromptError as e:
        raise ApiError(400, str(e), e.param, e.code) from None
    return Prepared(api, call.options, prompt.tokens, prompt.max_new_tokens)


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # also bytes that are not UTF-8, and integers of more than 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {json_problem(e, one_line=False)}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _conversation(call: Call, settings: Settings):
    call.request.max_new_tokens = call.options.max_tokens
    return prepare_conversation(
        encoding(), call.request, settings.generation, settings.context, call.options.max_tokens_key
    )


def _raw(call: Call, settings: Settings):
    if isinstance(call.prompt, str):
        try:  # special tokens written as text are those tokens: a harmony prompt can be written by hand
            tokens = encode_text(encoding(), call.prompt, special=True)
        except Exception as e:  # e.g. a lone surrogate, which is no UTF-8
            raise ApiError(400, f"prompt cannot be encoded: {e}", "prompt") from None
    else:
        tokens = call.prompt
        bad = next((t for t in tokens if not 0 <= t < settings.vocab), None)
        if bad is not None:
            raise ApiError(
                400, f"prompt: token id {bad} is not in the model's vocabulary of {settings.vocab}", "prompt"
            )
    return fit(
        tokens, call.options.max_tokens, COMPLETION_MAX_TOKENS, settings.context, "prompt", call.options.max_tokens_key
    )


def _start_worker(server_pid: int) -> None:
    threading.Thread(target=_end_with, args=(server_pid,), daemon=True, name="end-with-server").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for rank 0, which drains
    encoding()


def _end_with(pid: int) -> None:
    """A worker's queue never reports the API process gone (the worker holds both of its ends): an orphan would
    wait on it forever, keeping the forkserver and the job's stdout open. End when it does, however it ends."""
    try:
        select.select([os.pidfd_open(pid)], [], [])
    finally:
        os._exit(1)


class Preparer:
    """`await preparer(api, body)`: `prepare`, inline or in a worker process by the body's size."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # forkserver: the workers fork from one clean process (the API process runs threads); it imports
        # the entry script once, and every worker loads harmony's vocabulary as it starts.
        self.context = multiprocessing.get_context("forkserver")
        self.pools = {"small": self._new_pool("small"), "large": self._new_pool("large")}
        for pool in self.pools.values():
            pool.submit(int)  # start the forkserver and the workers now, while the model loads

    def _new_pool(self, lane: str) -> ProcessPoolExecutor:
        workers = 1 if lane == "small" else WORKERS
        return ProcessPoolExecutor(workers, mp_context=self.context, initializer=_start_worker, initargs=(os.getpid(),))

    async def __call__(self, api: str, body: bytes) -> Prepared:
        if len(body) <= INLINE_BYTES:
            return prepare(api, body, self.settings)
        lane = "small" if len(body) <= SMALL_BYTES else "large"
        pool = self.pools[lane]
        try:
            return await asyncio.wrap_future(pool.submit(prepare, api, body, self.settings))
        except BrokenProcessPool:
            # A worker died (killed for memory, a crash in native code): this request fails, later ones get
            # fresh workers.
            error(f"a worker preparing a {len(body)}-byte request died; starting new workers")
            if self.pools[lane] is pool:
                self.pools[lane] = self._new_pool(lane)
            raise ApiError(500, "the worker preparing this request died") from None

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
