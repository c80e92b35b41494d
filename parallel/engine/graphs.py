"""A step's inputs on the host, and the CUDA graphs that run steps from static copies of them.

Every step is replayed from a graph, so a step costs the GPU's time plus one launch, not the host's time to
launch a few hundred kernels (eager, a step with prompt tokens spent about 55 ms of host time to 25 ms of GPU time
on an H100): decode-only steps by their row count (rounded up to a power of two), steps with prompt tokens by
their token count (rounded up to a power of two, at least MIN_TOKENS), padded. All are captured when the engine
starts, largest first (smaller ones then reuse the pool's memory): one met mid-job would stall every running
request for its capture, and the first for torch.compile's compilation too. Padding tokens form one extra
sequence whose keys go to the null block 0; padding rows of a decode step likewise. All graphs read one set of
static inputs and share one memory pool: they run one at a time, and each step's logits are read before the next.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MIN_TOKENS = 256


@dataclass
class StepInputs:
    """A step's flat tokens (ids, positions, cache rows: (T,) int64; `prev`: where an id is PENDING, the row of
    the last step's sampled tokens that holds it, else -1), its sequences (cu: (B+1,) and seq_lens: (B,) int32,
    tables: (B, W) int32) and the token rows whose logits are due (take: (R,) int64)."""

    ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    prev: np.ndarray
    cu: np.ndarray
    seq_lens: np.ndarray
    tables: np.ndarray
    take: np.ndarray
    decode: bool

    @classmethod
    def of(cls, sequences, counts: list[int], block_size: int, decode: bool) -> StepInputs:
        """Sequence i computes counts[i] tokens from its `computed` on."""
        starts = np.fromiter((s.computed for s in sequences), dtype=np.int64, count=len(sequences))
        counts = np.asarray(counts, dtype=np.int64)
        cu = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(counts, out=cu[1:])
        seq = np.repeat(np.arange(len(sequences)), counts)
        positions = starts[seq] + np.arange(cu[-1]) - cu[:-1][seq]
        tables = np.zeros((len(sequences), max(len(s.blocks) for s in sequences)), dtype=np.int32)
        for i, s in enumerate(sequences):
            tables[i, : len(s.blocks)] = s.blocks
        slots = tables[seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
        ids = np.fromiter(
            itertools.chain.from_iterable(s.tokens[a : a + n] for s, a, n in zip(sequences, starts, counts)),
            dtype=np.int64,
            count=int(cu[-1]),
        )
        seq_lens = (starts + counts).astype(np.int32)
        due = np.nonzero(
            seq_lens == np.fromiter((len(s.tokens) for s in sequences), dtype=np.int32, count=len(sequences))
        )[0]
        # A PENDING token is its sequence's last, so only a due sequence's last row can hold one.
        prev = np.full(len(ids), -1, dtype=np.int64)
        waiting_for = np.fromiter(
            (s.out_row if s.unknown else -1 for s in sequences), dtype=np.int64, count=len(sequences)
        )[due]
        prev[cu[due + 1] - 1] = waiting_for
        return cls(ids, positions, slots, prev, cu.astype(np.int32), seq_lens, tables, cu[due + 1] - 1, decode)

    @classmethod
    def padding(cls, decode: bool) -> StepInputs:
        """A step of no sequences: loaded at a graph's size, it is padding alone."""
        none = np.zeros(0, dtype=np.int64)
        return cls(
            none,
            none,
            none,
            none,
            np.zeros(1, dtype=np.int32),
            np.zeros(0, dtype=np.int32),
            np.zeros((0, 0), dtype=np.int32),
            none,
            decode,
        )


def pinned(a: np.ndarray) -> torch.Tensor:
    """A host array in page-locked memory, for a copy to the GPU that queues behind the step it runs now instead
    of waiting for it (a copy from pageable memory may). torch's pinned allocator keeps the buffer until the copy
    has run."""
    return torch.from_numpy(a).pin_memory()


def power_of_two(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (n - 1).bit_length())


class StepGraphs:
    """`forward(ids, positions, slots, attend, take)` as in parallel/engine/runner.py; `decode` and `varlen` the
    two attentions of parallel/engine/attention.py. `rows`: the most sequences a step holds (slots), `tokens`: the
    most tokens (max_batched_tokens), `max_blocks`: the longest block table."""

    def __init__(
        self,
        forward: Callable,
        decode: Callable,
        varlen: Callable,
        rows: int,
        tokens: int,
        max_blocks: int,
        device: torch.device,
    ):
        self.forward, self.decode, self.varlen = forward, decode, varlen
        self.rows = power_of_two(rows) + 1  # a decode graph's rows; a mixed step's sequences and its padding one
        self.max_tokens = power_of_two(tokens, MIN_TOKENS)
        self.tok = torch.zeros(4, self.max_tokens, dtype=torch.long, device=device)  # ids, positions, slots, prev
        self.meta = torch.zeros(2, self.rows + 1, dtype=torch.int32, device=device)  # cu, then seq_lens
        self.tables = torch.zeros(self.rows, max_blocks, dtype=torch.int32, device=device)
        self.take = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture_all(self) -> None:
        for kind, smallest, largest in (("mixed", MIN_TOKENS, self.max_tokens), ("decode", 1, self.rows - 1)):
            size = largest
            while size >= smallest:
                self.graphs[kind, size] = self._capture(kind, size)
                size //= 2

    def release(self) -> None:
        """Every graph freed now, whoever still refers to it (see Runner.close)."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def run(self, step: StepInputs) -> torch.Tensor:
        """The logits of the step's due tokens, through its graph."""
        key = (
            ("decode", power_of_two(len(step.ids)))
            if step.decode
            else ("mixed", power_of_two(len(step.ids), MIN_TOKENS))
        )
        graph, logits = self.graphs[key]
        self._load(step, key[1])
        graph.replay()
        return logits[: len(step.take)]

    def _load(self, step: StepInputs, size: int) -> None:
        """The step's inputs into the static buffers, padded to `size` tokens."""
        n, b = len(step.ids), len(step.seq_lens)
        tok = np.zeros((4, size), dtype=np.int64)  # padding tokens: token 0 written to the null block
        tok[:, :n] = step.ids, step.positions, step.slots, step.prev
        tok[3, n:] = -1
        meta = np.ones((2, self.rows + 1), dtype=np.int32)
        if step.decode:
            meta[1, :b] = step.seq_lens
        else:  # the padding tokens are one more sequence, over the null block; later sequences are empty
            tok[1, n:] = np.arange(size - n)
            meta[0, : b + 1], meta[0, b + 1 :] = step.cu, size
            meta[1, :b], meta[1, b] = step.seq_lens, max(size - n, 1)
            self.tables[b].zero_()
        self.tok[:, :size].copy_(pinned(tok), non_blocking=True)
        self.meta.copy_(pinned(meta), non_blocking=True)
        self.tables[:b, : step.tables.shape[1]].copy_(pinned(step.tables), non_blocking=True)
        if not step.decode:
            take = np.zeros(self.rows, dtype=np.int64)
            take[: len(step.take)] = step.take
            self.take.copy_(pinned(take), non_blocking=True)

    def _step(self, kind: str, size: int) -> torch.Tensor:
        ids, positions, slots, prev = self.tok[:, :size]
        if kind == "decode":
            lens, tables = self.meta[1, :size], self.tables[:size]

            def attend(q, k_cache, v_cache, sinks, scaling, window):
                return self.decode(q, k_cache, v_cache, tables, lens, sinks, scaling, window)

            return self.forward(ids, prev, positions, slots, attend)
        cu, lens = self.meta[0], self.meta[1, :-1]

        def attend(q, k_cache, v_cache, sinks, scaling, window):
            return self.varlen(q, k_cache, v_cache, cu, lens, self.tables, sinks, scaling, window)

        return self.forward(
            ids, prev, positions, slots, attend, self.take[: min(size, self.rows)]
        )  # a row a sequence at most

    def _capture(self, kind: str, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm-ups (compilation, autotuning) then the capture, on padding alone, laid out as a live step pads: every
        key goes to the null block, so no live sequence's cache is touched, and every token is attended, so no layer
        reads memory nothing wrote. (With every sequence empty instead, attention wrote none of its output and the
        warm-ups ran the MoE layers on whatever the pool held.)"""
        self._load(StepInputs.padding(kind == "decode"), size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(kind, size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(kind, size)
        return graph, logits
