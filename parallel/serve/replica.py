"""Every rank of a serving replica: run the batches its leader claims, streaming each step's tokens back through
the store (keys under serve/, see parallel/serve/batcher.py)."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from openai_harmony import HarmonyEncoding

from parallel.config import GenerationConfig
from parallel.distributed.mesh import Placement
from parallel.engine.engine import Engine
from parallel.engine.plain import Plain
from parallel.log import error
from parallel.protocol.harmony import stop_tokens
from parallel.serve.batcher import Sampling

# A leader with no batch to run tells its replica so this often: a quiet server is not a hung collective.
IDLE_BEAT_S = 5.0
POLL_S = 0.002


def serve_batches(place: Placement, store: dist.Store, generator: Engine | Plain, enc: HarmonyEncoding, gen: GenerationConfig) -> None:
    """Every rank: run the batches this replica claims until it claims a stop. With the engine, batches published
    while one runs join it (continuous batching across requests); one it claims but cannot join comes back as
    `held` and runs next."""
    claimed = held = None
    while True:
        work = [None]
        if place.is_leader:
            if held is None and claimed is None:
                claimed = store.add("serve/next", 1) - 1
            if held is not None:
                work, held = [held], None
            elif _appears(store, f"serve/batch/{claimed}", IDLE_BEAT_S):
                work, claimed = [(claimed, json.loads(store.get(f"serve/batch/{claimed}")))], None
            else:  # nothing yet: say so, so that the replica's next collective is not late
                work = ["idle"]
        if place.replica_group is not None:
            dist.broadcast_object_list(work, src=place.leader, group=place.replica_group)
        if work[0] == "idle":
            continue
        k, batch = work[0]
        if batch.get("stop"):
            return
        run = _Run(place, store, generator, enc, gen, k, batch, claimed)
        run.go()
        claimed, held = run.claimed, run.held


def _appears(store: dist.Store, key: str, within_s: float) -> bool:
    """Polls rather than store.wait, whose every timeout c10d logs as a warning."""
    deadline = time.monotonic() + within_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


class _Run:
    """One generate call on a replica: batch k, plus (engine only) the batches of the same sampling that are
    published while it runs. Engine rows are numbered across the joined batches; `rows` maps them back."""

    def __init__(self, place: Placement, store: dist.Store, generator: Engine | Plain, enc: HarmonyEncoding,
                 gen: GenerationConfig, k: int, batch: dict, claimed: int | None):
        self.place, self.store, self.generator, self.enc, self.gen = place, store, generator, enc, gen
        self.k, self.batch, self.sampling = k, batch, Sampling(**batch["sampling"])
        self.claimed, self.held = claimed, None  # the leader's claim on the next batch, and one it could not join
        self.rows: list[tuple[int, int]] = []  # run row -> (batch, row in it)
        self.steps: dict[int, itertools.count] = {}
        self.cancels_seen: dict[int, int] = {}
        self.first_row: dict[int, int] = {}
        self.cancelled: list[bool] = []

    def _add(self, k: int, batch: dict) -> list[tuple[list[int], int]]:
        self.first_row[k], self.steps[k], self.cancels_seen[k] = len(self.rows), itertools.count(), 0
        self.rows += [(k, r) for r in range(len(batch["prompts"]))]
        self.cancelled += [False] * len(batch["prompts"])
        return list(zip(batch["prompts"], batch["max_tokens"]))

    def go(self) -> None:
        rows = self._add(self.k, self.batch)
        prompts, limits = [p for p, _ in rows], [n for _, n in rows]
        gen = replace(self.gen, temperature=self.sampling.temperature, top_p=self.sampling.top_p)
        hooks = dict(stop={} if self.sampling.ignore_eos else stop_tokens(self.enc), seed=self.gen.seed + self.k,
                     on_step=self.on_step if self.place.is_leader else None, cancelled=self.check_cancelled)
        if self.generator.joins:
            hooks["incoming"] = self.incoming
        end = {"end": True}
        try:
            self.generator.generate(prompts, limits, gen, **hooks)
        except torch.OutOfMemoryError as e:  # these requests fail; the server keeps serving
            error(f"batches {sorted(self.steps)} failed: {e}")
            end["error"] = f"out of memory: {e}"
            torch.cuda.empty_cache()
        if self.place.is_leader:
            for k, steps in self.steps.items():
                self.store.set(f"serve/step/{k}/{next(steps)}", json.dumps(end))

    def on_step(self, pairs: list[tuple[int, int]]) -> None:
        by_batch: dict[int, list] = {}
        for row, token in pairs:
            k, r = self.rows[row]
            by_batch.setdefault(k, []).append((r, token))
        for k, tokens in by_batch.items():
            self.store.set(f"serve/step/{k}/{next(self.steps[k])}", json.dumps({"tokens": tokens}))

    def incoming(self) -> list[tuple[list[int], int]]:
        """A batch published since the last step joins if it samples the same way; any other is held for later."""
        new = [None]
        if self.place.is_leader and self.held is None:
            if self.claimed is None:
                self.claimed = self.store.add("serve/next", 1) - 1
            if self.store.check([f"serve/batch/{self.claimed}"]):
                batch = json.loads(self.store.get(f"serve/batch/{self.claimed}"))
                if batch.get("stop") or Sampling(**batch["sampling"]) != self.sampling:
                    self.held = (self.claimed, batch)
                else:
                    new = [(self.claimed, batch)]
                self.claimed = None
        if self.place.replica_group is not None:
            dist.broadcast_object_list(new, src=self.place.leader, group=self.place.replica_group)
        return self._add(*new[0]) if new[0] else []

    def check_cancelled(self) -> list[bool]:
        if self.place.is_leader:
            for k, seen in self.cancels_seen.items():
                if self.store.add(f"serve/ncancel/{k}", 0) != seen:
                    rows = self.store.get(f"serve/cancel/{k}").decode().rstrip(",").split(",")
                    self.cancels_seen[k] = len(rows)
                    for r in rows:
                        self.cancelled[self.first_row[k] + int(r)] = True
        if self.place.replica_group is None:
            return self.cancelled
        mask = torch.tensor(self.cancelled, device=self.generator.device)
        dist.broadcast(mask, src=self.place.leader, group=self.place.replica_group)
        return mask.tolist()
