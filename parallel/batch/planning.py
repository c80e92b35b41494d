"""From input lines to work (rank 0, before any model loads): each request the output does not hold yet, rendered
with harmony and budgeted; lines that cannot run become error records to write at once."""

from __future__ import annotations

from collections.abc import Iterable

from openai_harmony import HarmonyEncoding

from parallel.batch.output import OutputFile
from parallel.batch.records import error_record, record_key
from parallel.config import GenerationConfig
from parallel.engine.interface import Sampling, Work
from parallel.protocol.prompts import PromptError, prepare
from parallel.protocol.requests import Request


def plan_work(
    requests: Iterable[Request | dict], out: OutputFile, enc: HarmonyEncoding, gen: GenerationConfig, context: int
) -> tuple[list[Work], list[dict]]:
    """Work in input order, tagged (id, line) for its record; a request's sampling seed is generation.seed plus
    its line number, so a resumed job samples each request as the first run would have."""
    work, errors = [], []
    for req in requests:
        record = req if isinstance(req, dict) else None  # a line read_requests already rejected
        if record is None:
            try:
                prompt = prepare(enc, req, gen, context)
            except PromptError as e:
                record = error_record(req.id, req.index, f"line {req.index}: {e}", prompt_tokens=e.prompt_tokens)
        if record is not None:
            if record_key(record) not in out.done:
                errors.append(record)
        elif ("id", req.id) not in out.done:
            sampling = Sampling(
                gen.temperature if req.temperature is None else req.temperature,
                gen.top_p if req.top_p is None else req.top_p,
                gen.seed + req.index if req.seed is None else req.seed,
            )
            work.append(Work(len(work), prompt.tokens, prompt.max_new_tokens, sampling, tag=(req.id, req.index)))
    return work, errors
