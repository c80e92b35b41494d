"""The batch job's two ends of the replica loop (parallel/replicas/loop.py).

Rank 0 plans the work before any model loads and gives it all to the dispatcher, which hands requests to the
replicas as they have room (no batches, no barrier: each replica keeps its engine full across the whole
input). Each replica's leader turns a finished request's tokens into its record (harmony-parsed) and sends the
records of each step to rank 0, whose writer appends them to the output as they come.
"""

from __future__ import annotations

from openai_harmony import HarmonyEncoding

from parallel.batch.records import error_record, result_record
from parallel.engine.interface import Completion, Event, Work
from parallel.protocol.harmony import parse_completion
from parallel.replicas.channel import Link


class RecordMaker:
    """A leader's reporter for the batch job: records of the requests that finished, sent once a step."""

    def __init__(self, enc: HarmonyEncoding, keep_raw: bool):
        self.enc, self.keep_raw = enc, keep_raw
        self.work: dict[int, Work] = {}
        self.tokens: dict[int, list[int]] = {}
        self.ready: list[dict] = []
        self.rids: list[int] = []

    def add(self, work: list[Work]) -> None:
        for w in work:
            self.work[w.rid], self.tokens[w.rid] = w, []

    def events(self, events: list[Event]) -> None:
        for event in events:
            self.tokens[event.rid] += event.tokens
            if event.reason is not None:
                self.ready.append(self._record(event))
                self.rids.append(event.rid)

    def _record(self, event: Event) -> dict:
        work, tokens = self.work.pop(event.rid), self.tokens.pop(event.rid)
        (rid, index), prompt_tokens = work.tag, len(work.prompt)
        if event.reason.startswith("error"):
            return error_record(rid, index, f"line {index}: {event.reason.removeprefix('error: ')}", prompt_tokens)
        parsed = parse_completion(self.enc, tokens, finished=event.reason != "length")
        record = result_record(
            rid, index, prompt_tokens, Completion(tokens, event.reason), parsed, self.enc.decode(tokens), self.keep_raw
        )
        record["timing"] = {"queued_s": round(event.queued_s, 4), "first_token_s": round(event.first_token_s, 4)}
        return record

    def flush(self, link: Link) -> None:
        if self.ready:
            link.send(("records", self.ready, self.rids))
            self.ready, self.rids = [], []
