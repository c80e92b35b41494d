"""Which tokens the next step computes: one token budget, running requests first, then chunks of waiting prompts.

As vLLM's scheduler does, there is no prefill phase and decode phase: each sequence has `computed` tokens in the
KV cache and `len(tokens)` known ones, and a step gives tokens to sequences until they catch up. A running
sequence that cannot get a block for its next tokens preempts the newest running one (its blocks are freed and
it is recomputed later), never an out-of-memory error. New prompts are admitted only in steps that preempted
nothing, while fewer than `slots` run. Pure Python and deterministic: every rank of a replica schedules alike.

The engine schedules a step while the GPU still runs the one before (parallel/engine/engine.py), so a sequence's
last tokens may be PENDING: made by a step whose result the host has not read yet. The step that computes such a
token reads it on the GPU; it is keyed for the prefix cache once known.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from parallel.engine.blocks import BlockPool
from parallel.engine.interface import Sampling, Work

PENDING = -1


@dataclass(eq=False)
class Sequence:
    rid: int
    tokens: list[int]  # the prompt, then each token made
    prompt_len: int
    max_new_tokens: int
    sampling: Sampling
    arrived: float = field(default_factory=time.perf_counter)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    keyed: int = 0  # full blocks remembered by the prefix cache, and the last one's key
    last_key: int | None = None
    admitted: float | None = None
    first_token: float | None = None
    unknown: int = 0  # trailing PENDING tokens
    out_row: int = -1  # the row of its last step's sampled tokens that holds its last PENDING token

    @classmethod
    def of(cls, work: Work, context: int) -> Sequence:
        """Its new tokens are bounded by the model's context as by its own limit."""
        budget = min(work.max_new_tokens, context - len(work.prompt))
        return cls(work.rid, list(work.prompt), len(work.prompt), budget, work.sampling)

    @property
    def made(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def known(self) -> int:
        return len(self.tokens) - self.unknown


@dataclass
class Step:
    sequences: list[Sequence]
    counts: list[int]  # tokens each computes in this step, from its `computed` on

    @property
    def decode_only(self) -> bool:
        return all(n == 1 and s.computed == len(s.tokens) - 1 for s, n in zip(self.sequences, self.counts))


class Scheduler:
    def __init__(self, pool: BlockPool, slots: int, max_batched_tokens: int):
        self.pool, self.slots, self.budget = pool, slots, max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def fits(self, seq: Sequence) -> bool:
        """Whether the whole pool could ever hold the sequence at its longest."""
        return self.blocks_for(seq.prompt_len + seq.max_new_tokens) <= self.pool.capacity

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    def schedule(self) -> Step:
        step = Step([], [])
        budget = self.budget
        preempted = False
        i = 0
        while i < len(self.running) and budget:
            seq = self.running[i]
            if seq.made >= seq.max_new_tokens:  # its last token, still PENDING, ends it: nothing to compute
                i += 1
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self._grow(seq, seq.computed + n):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                continue
            step.sequences.append(seq)
            step.counts.append(n)
            budget -= n
            i += 1
        while self.waiting and budget and not preempted and len(self.running) < self.slots:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self._grow(seq, seq.computed + n):
                self._preempt(seq)
                break
            step.sequences.append(seq)
            step.counts.append(n)
            budget -= n
        return step

    def _admit(self, seq: Sequence) -> bool:
        """Running, with whatever prefix the cache holds; False (nothing held) unless the free blocks hold its
        known tokens with a block to spare for each running sequence's next tokens (admitting into a full cache
        would only preempt others)."""
        blocks, key = self.pool.match(seq.tokens)
        need = self.blocks_for(len(seq.tokens)) - len(blocks) + len(self.running)
        if self.running and need > self.pool.num_free():
            self.pool.release(blocks)
            return False
        seq.blocks, seq.last_key, seq.keyed = blocks, key, len(blocks)
        seq.computed = len(blocks) * self.pool.block_size
        seq.admitted = seq.admitted or time.perf_counter()
        self.running.append(seq)
        return True

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        more = self.blocks_for(tokens) - len(seq.blocks)
        if more <= 0:
            return True
        blocks = self.pool.allocate(more)
        if blocks is None:
            return False
        seq.blocks += blocks
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue with nothing in the cache; its tokens are recomputed when it returns."""
        self.preemptions += 1
        self._drop(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Done, wherever it is (running, or waiting after a preemption)."""
        self._drop(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _drop(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.computed, seq.keyed, seq.last_key = [], 0, 0, None
        if seq in self.running:
            self.running.remove(seq)

    def computed(self, step: Step) -> list[Sequence]:
        """Record what a step computed; the sequences whose every token is now in the cache, whose next token the
        step's logits give. Full blocks are keyed as far as their tokens are known."""
        done = []
        for seq, n in zip(step.sequences, step.counts):
            seq.computed += n
            full = min(seq.computed, seq.known) // self.pool.block_size
            if full > seq.keyed:
                seq.last_key = self.pool.remember(seq.blocks, seq.tokens, seq.keyed, full, seq.last_key)
                seq.keyed = full
            if seq.computed == len(seq.tokens):
                done.append(seq)
        return done
