"""From requests to batches (rank 0, before any model loads) and from a batch to records (every replica)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from openai_harmony import HarmonyEncoding

from parallel.batch.output import OutputFile
from parallel.batch.records import error_record, record_key, result_record
from parallel.config import GenerationConfig
from parallel.engine.engine import Engine
from parallel.engine.plain import Plain
from parallel.protocol.harmony import parse_completion, render_prompt, stop_tokens
from parallel.protocol.requests import Request


def plan_work(
    requests: Iterable[Request | dict],
    out: OutputFile,
    enc: HarmonyEncoding,
    gen: GenerationConfig,
    context_length: int,
) -> tuple[list[list[dict]], list[dict]]:
    """Render every request the output does not hold yet, in input order, `gen.batch_size` to a batch.
    Lines that cannot run come back as error records to write at once."""
    items, errors = [], []
    for req in requests:
        if isinstance(req, dict):  # a line read_requests already rejected
            record = req
        else:
            record = None
            try:
                prompt = render_prompt(enc, req, gen.reasoning_effort, gen.conversation_date)
            except Exception as e:  # harmony rejects what it cannot render, e.g. a tool schema it cannot type
                record = error_record(req.id, req.index, f"line {req.index}: cannot render with harmony: {e}")
            else:
                max_new = req.max_new_tokens or gen.max_new_tokens
                if len(prompt) + max_new > context_length:
                    record = error_record(
                        req.id,
                        req.index,
                        f"line {req.index}: {len(prompt)} prompt tokens + max_new_tokens {max_new} exceed the "
                        f"model's context of {context_length}",
                        prompt_tokens=len(prompt),
                    )
        if record is None:
            if ("id", req.id) not in out.done:
                items.append({"id": req.id, "index": req.index, "prompt": prompt, "max_new_tokens": max_new})
        elif record_key(record) not in out.done:
            errors.append(record)
    batches = [items[i : i + gen.batch_size] for i in range(0, len(items), gen.batch_size)]
    return batches, errors


def batch_runner(generator: Engine | Plain, enc: HarmonyEncoding, gen: GenerationConfig, keep_raw: bool) -> Callable[[list[dict], int], list[dict]]:
    """run(batch, k): generate batch k (seeded by gen.seed and k) and turn each completion into its record."""
    stop = stop_tokens(enc)

    def run(batch: list[dict], k: int) -> list[dict]:
        prompts, limits = [item["prompt"] for item in batch], [item["max_new_tokens"] for item in batch]
        completions, timing = generator.generate(prompts, limits, gen, stop=stop, seed=gen.seed + k)
        return [
            result_record(
                item["id"],
                item["index"],
                len(item["prompt"]),
                c,
                parse_completion(enc, c.tokens, finished=c.finish_reason != "length"),
                enc.decode(c.tokens),
                keep_raw,
            )
            | {"timing": {"first_token_s": round(timing.first_token_s, 4), "batch_s": round(timing.batch_s, 4)}}
            for item, c in zip(batch, completions)
        ]

    return run
