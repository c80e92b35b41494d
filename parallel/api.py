"""Generation from Python, in this process: the launcher's config, layouts, loading and replica loop behind one object.

    from parallel.api import LLM

    with LLM("configs/gpt-oss-20b.yaml", ["parallel.tp=2"]) as llm:  # torchrun --nproc_per_node=2 script.py
        out = llm.chat([{"role": "user", "content": "Hi"}])[0]
        print(out.final, out.finish_reason)

Run it as one process (`python script.py`) or under torchrun (`torchrun --nproc_per_node=4 script.py`), where it is
SPMD: every rank constructs the LLM and makes the same calls, in the same order (only rank 0's arguments are
used for generating, but every rank checks them, so a bad argument fails on every rank alike). Each call is one round
of the batch job's flow: rank 0's dispatcher hands the requests to the data-parallel replicas as they have room,
every replica runs the replica loop, and the round ends once every request has ended. Rank 0 gets the outputs, in the
order of the prompts; every other rank gets None.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from openai_harmony import HarmonyEncoding

from parallel.config import merge_config
from parallel.distributed.runtime import join_job
from parallel.engine.interface import Event, Sampling, Work
from parallel.job import Run, finish_job, load_backend, open_links
from parallel.loading.model import plan_model
from parallel.protocol.harmony import encoding, parse_completion
from parallel.protocol.prompts import Prompt, fit, prepare
from parallel.protocol.requests import parse_request
from parallel.replicas.dispatcher import Dispatcher
from parallel.replicas.loop import Replica
from parallel.replicas.streamer import TokenStreamer

# Nobody streams from a call here: a replica's leader sends rank 0 a request's tokens this many steps at a time (its
# first and last at once), which keeps the messages few.
SEND_EVERY_STEPS = 32


@dataclass
class Output:
    """One request's completion and what harmony parsed from it."""

    token_ids: list[int]  # the new tokens; ends with the stop token (<|return|>, <|call|>) that ended it, if one did
    finish_reason: str  # stop, tool_call, length, or error
    final: str
    analysis: str
    tool_calls: list[dict]  # [{"name", "arguments"}], arguments as the JSON string the model wrote
    error: str | None  # why the request could not run, or where its output stopped being valid harmony


class LLM:
    """A model loaded on this job's ranks, as `launch/generate.py` loads it: `config` is a YAML file under configs/,
    `overrides` its `key=value` overrides. Use `close()` (or `with`) to leave the job."""

    def __init__(self, config: str, overrides: Sequence[str] = ()):
        # plan_run's steps, but raising what is wrong (ConfigError, LayoutError, VocabularyError...) to the caller
        # rather than logging it for an entry script's exit code.
        cfg = merge_config(config, list(overrides))
        run = Run(cfg, *plan_model(cfg), encoding())
        self.gen, self.replicas, self.enc = cfg.generation, run.layout.dp, run.enc
        self.context, self.vocab = run.shape.max_position_embeddings, run.shape.vocab_size
        # A single process makes a world of one and says so in RANK, MASTER_PORT...: close() takes them back, so that
        # a later LLM, or a launcher this process starts, does not join a job that is over.
        environment = set(os.environ)
        self.place, self.watchdog, store = join_job(run.layout, cfg.runtime)
        self.added_environment = set(os.environ) - environment
        self.backend = load_backend(run, self.place)
        if self.backend is None:
            raise RuntimeError(f"cannot load {cfg.model.path} as configured (the error above says why)")
        self.hub, self.link = open_links(self.place, store, run.layout.dp)
        self.rids = itertools.count()  # request ids unique over the job's life, as the backends expect

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[Output] | None:
        """Complete each prompt of token ids (e.g. rendered with openai-harmony). Unset arguments come from the config's
        `generation` section; max_new_tokens must fit the context after every prompt. Prompt i samples with seed
        `seed + i`: a sampled output depends on its seed and the layout, not on the other prompts of the call."""
        prompts = []
        for i, ids in enumerate(prompt_token_ids):
            ids = list(ids)
            if not ids or not all(isinstance(t, int) and 0 <= t < self.vocab for t in ids):
                raise ValueError(f"prompt_token_ids[{i}] must be a non-empty list of token ids below {self.vocab}")
            prompts.append(fit(ids, max_new_tokens, self.gen.max_new_tokens, self.context, "prompt_token_ids"))
        return self._run(prompts, self._sampling(temperature, top_p, seed))

    def chat(
        self,
        messages: list,
        tools: list[dict] | None = None,
        reasoning_effort: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[Output] | None:
        """Complete a conversation (a list of OpenAI chat messages), or each of a list of them, rendered with harmony as
        the launcher renders its input lines; `tools` are OpenAI function tools, offered in every conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for i, conversation in enumerate(conversations):
            request = parse_request(
                {
                    "messages": conversation,
                    "tools": tools or [],
                    "reasoning_effort": reasoning_effort,
                    "max_new_tokens": max_new_tokens,
                },
                i,
            )
            prompts.append(prepare(self.enc, request, self.gen, self.context))
        return self._run(prompts, self._sampling(temperature, top_p, seed))

    def _sampling(self, temperature: float | None, top_p: float | None, seed: int | None) -> Sampling:
        sampling = Sampling(
            self.gen.temperature if temperature is None else temperature,
            self.gen.top_p if top_p is None else top_p,
            self.gen.seed if seed is None else seed,
        )
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ValueError(
                f"temperature must be >= 0 and top_p in (0, 1], not {sampling.temperature}, {sampling.top_p}"
            )
        return sampling

    def _run(self, prompts: list[Prompt], sampling: Sampling) -> list[Output] | None:
        """Every rank: one round of the replica loop, until every request has ended. Rank 0 hands out the work and
        gathers what comes back."""
        if self.watchdog is None:
            raise RuntimeError("this LLM is closed")
        results = None
        if self.place.rank == 0:
            work = [
                Work(next(self.rids), p.tokens, p.max_new_tokens, replace(sampling, seed=sampling.seed + i))
                for i, p in enumerate(prompts)
            ]
            results = Results(work)
            dispatcher = Dispatcher(self.hub, self.replicas, results.deliver)
            dispatcher.submit(work)
            dispatcher.close()  # all the work there is: each replica stops once it has run out
            dispatcher.start()
        reporter = TokenStreamer(SEND_EVERY_STEPS) if self.place.is_leader else None
        Replica(self.place, self.backend, self.link, reporter).run()
        if results is None:
            return None
        dispatcher.finished.wait()
        return [results.output(w.rid, self.enc) for w in work]

    def close(self) -> None:
        """Leave the job (every rank together); the LLM cannot generate after this."""
        if self.watchdog is None:
            return
        finish_job(self.watchdog, self.backend)
        self.watchdog = None
        for key in self.added_environment:
            os.environ.pop(key, None)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Results:
    """Rank 0: each request's tokens as its replica sends them (on the dispatcher's thread), and its last event."""

    def __init__(self, work: list[Work]):
        self.tokens: dict[int, list[int]] = {w.rid: [] for w in work}
        self.last: dict[int, Event] = {}

    def deliver(self, kind: str, events: list[Event]) -> None:
        for event in events:
            self.tokens[event.rid] += event.tokens
            if event.reason is not None:
                self.last[event.rid] = event

    def output(self, rid: int, enc: HarmonyEncoding) -> Output:
        tokens, reason = self.tokens[rid], self.last[rid].reason
        if reason.startswith("error"):
            return Output(tokens, "error", "", "", [], reason.removeprefix("error: "))
        parsed = parse_completion(enc, tokens, finished=reason != "length")
        return Output(tokens, reason, parsed.final, parsed.analysis, parsed.tool_calls, parsed.error)
