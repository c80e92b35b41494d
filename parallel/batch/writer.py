"""Rank 0's writer: the only writer of the output, appending each finished batch's records as it arrives."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from tqdm import tqdm

from parallel.batch.output import OutputFile
from parallel.distributed.runtime import open_store

POLL_S = 0.05
STOP_WAIT_S = 10.0


@dataclass
class Totals:
    """What the metrics need of the records written, as running sums: a long job keeps no records in memory."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_s: float = 0.0  # summed over the records that carry timing
    timed: int = 0

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.requests += 1
            self.errors += r["error"] is not None
            self.prompt_tokens += r["usage"]["prompt_tokens"]
            self.generated_tokens += r["usage"]["completion_tokens"]
            if "timing" in r:
                self.first_token_s += r["timing"]["first_token_s"]
                self.timed += 1


class Writer(threading.Thread):
    """Rank 0's writer: appends each finished batch's records to the output as soon as it arrives."""

    def __init__(self, out: OutputFile, n_batches: int, n_requests: int, timeout_s: float, echo: bool, progress: bool):
        super().__init__(daemon=True, name="writer")
        self.out, self.n_batches, self.echo = out, n_batches, echo
        self.store = open_store(timeout_s)
        self.lock = threading.Lock()
        self.totals = Totals()
        self.batches_written = 0
        self.failure: BaseException | None = None
        self.start_time = time.monotonic()
        self.bar = tqdm(total=n_requests, unit="req", disable=not progress, dynamic_ncols=True)

    def run(self) -> None:
        try:
            while self.batches_written < self.n_batches:
                if not self.poll():
                    time.sleep(POLL_S)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which reports it
            self.failure = e

    def poll(self) -> bool:
        """Write every batch finished since the last poll; False when there was none."""
        with self.lock:
            return self._collect()

    def _collect(self) -> bool:
        before = self.batches_written
        finished = self.store.add("ndone", 0)
        # A leader bumps `ndone` and then sets done/{j}: check before reading, so that a leader killed between the
        # two can never block the writer (that batch simply has no record and runs again on resume).
        while self.batches_written < finished and self.store.check([f"done/{self.batches_written}"]):
            k = self.store.get(f"done/{self.batches_written}").decode()
            self.write(json.loads(self.store.get(f"result/{k}")))
            self.store.delete_key(f"result/{k}")
            self.batches_written += 1
        return self.batches_written > before

    def write(self, records: list[dict]) -> None:
        self.out.write(records)
        self.totals.add(records)
        self.bar.update(len(records))
        self.bar.set_postfix_str(f"{self.totals.generated_tokens / (time.monotonic() - self.start_time):.1f} tok/s")
        if self.echo:
            for r in records:
                answer = r["final"] or json.dumps(r["tool_calls"]) if r["error"] is None else f"{r['error']} {r.get('raw', '')!r:.80}"
                tqdm.write(f"[{r['id']}] {r['finish_reason']}: {answer}")

    def stop(self) -> str:
        """For a signal handler: keep what the replicas already finished, then let no write begin (the lock is
        never released). Bounded: a writer stuck on a dying store only costs the records it was fetching."""
        if self.lock.acquire(timeout=STOP_WAIT_S):
            try:
                self._collect()
            except Exception:  # noqa: BLE001 - the store may be gone with the job; what is written stays
                pass
        return f"{len(self.out.done)} records are in {self.out.path}; run again with the same data.output to resume"

    def finish(self) -> None:
        self.join()
        self.bar.close()
        if self.failure is not None:
            raise RuntimeError(f"writing {self.out.path} failed: {self.failure}") from self.failure


