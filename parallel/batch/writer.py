"""Rank 0's writer: the only writer of the output, appending each message of records as the dispatcher gets it."""

from __future__ import annotations

import json
import threading
import time

from tqdm import tqdm

from parallel.batch.output import OutputError, OutputFile
from parallel.distributed.runtime import fatal

STOP_WAIT_S = 10.0


class Totals:
    """What the metrics need of the records written, as running sums: a long job keeps no records in memory.
    first_token_s sums over the `timed` records that carry timing."""

    def __init__(self):
        self.requests = self.errors = self.prompt_tokens = self.generated_tokens = self.timed = 0
        self.first_token_s = 0.0

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.requests += 1
            self.errors += r["error"] is not None
            self.prompt_tokens += r["usage"]["prompt_tokens"]
            self.generated_tokens += r["usage"]["completion_tokens"]
            if "timing" in r:
                self.first_token_s += r["timing"]["first_token_s"]
                self.timed += 1


class Writer:
    def __init__(self, out: OutputFile, n_requests: int, echo: bool, progress: bool):
        self.out, self.echo = out, echo
        self.lock = threading.Lock()
        self.totals = Totals()
        self.start = time.monotonic()
        self.bar = tqdm(total=n_requests, unit="req", disable=not progress, dynamic_ncols=True)

    def deliver(self, kind: str, records: list[dict]) -> None:
        """The dispatcher's hand-off. A record's `finished_s` is when it reached rank 0, from the job's start. A
        failure to write ends the job: what is written stays, and a rerun resumes from it."""
        finished = round(time.monotonic() - self.start, 3)
        for r in records:
            if "timing" in r:
                r["timing"]["finished_s"] = finished
        with self.lock:
            try:
                self.out.write(records)
            except OutputError as e:  # a full disk: the records before these are whole, and nothing more is written
                fatal(f"{e} ({len(self.out.done)} records are in it)")
            self.totals.add(records)
            self.bar.update(len(records))
            self.bar.set_postfix_str(f"{self.totals.generated_tokens / (time.monotonic() - self.start):.1f} tok/s")
            if self.echo:
                for r in records:
                    answer = (
                        r["final"] or json.dumps(r["tool_calls"])
                        if r["error"] is None
                        else f"{r['error']} {r.get('raw', '')!r:.80}"
                    )
                    line = f"[{r['id']}] {r['finish_reason']}: {answer}"
                    tqdm.write(line.encode("utf-8", "backslashreplace").decode())  # text UTF-8 cannot hold, escaped

    def stop(self) -> str:
        """For a signal handler: let the write in progress finish, then let no other begin (the lock is kept)."""
        self.lock.acquire(timeout=STOP_WAIT_S)
        return f"{len(self.out.done)} records are in {self.out.path}; run again with the same data.output to resume"

    def close(self) -> None:
        self.bar.close()
