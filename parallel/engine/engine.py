"""The fast engine: one step at a time under a token budget, over a paged KV cache, for as many requests as
come (the replica loop hands them over between steps).

A step is what the scheduler (parallel/engine/scheduler.py) gives it: the running requests' next tokens first,
then chunks of waiting prompts, flattened; the runner (parallel/engine/runner.py) computes them through the
model's own weights and the paged cache (every step a CUDA graph on GPU); the sampler picks each finished
sequence's next token. The host runs a step ahead of the GPU: it schedules and launches step N+1 before it reads
step N's tokens (step N+1 takes them from the GPU), so its own work (scheduling, inputs, the events) overlaps the
GPU's instead of adding to every step; a request that ended in step N costs a wasted row in step N+1.

The KV cache takes the memory left after loading (or `engine.cache_gib`), in blocks; a request that could never
fit it is refused with an error, and when blocks run out the newest running request is preempted and recomputed
later. Full blocks are shared between requests with the same prefix.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from parallel.config import EngineConfig, KvCacheDtype
from parallel.engine.attention import choose_attention
from parallel.engine.blocks import BlockPool
from parallel.engine.interface import Event, Work, finish_reason
from parallel.engine.runner import Runner
from parallel.engine.sampling import sample
from parallel.engine.scheduler import PENDING, Scheduler, Sequence
from parallel.log import log

# GPU memory the KV cache leaves free: a full step's activations (max_batched_tokens rows through the experts),
# the logits of `slots` rows in float32, the CUDA graphs' pools, NCCL's buffers.
CACHE_HEADROOM_BYTES = 6 * 2**30
# On CPU (tests, small models) the cache takes this unless engine.cache_gib says otherwise.
CPU_CACHE_BYTES = 2**30
# The token of a row whose logits hold a NaN (a broken checkpoint, or a kernel fault): argmax would return the NaN's
# index, the same nonsense every step, and nothing would say so. The request ends with an error instead.
NO_TOKEN = -1


class Engine:
    """The Backend of parallel/engine/interface.py. `stop`: the stop tokens and the finish reason each means."""

    def __init__(self, model, cfg: EngineConfig, stop: dict[int, str], group=None):
        self.cfg, self.stop, self.group = cfg, stop, group
        self.context = model.config.max_position_embeddings
        cache_dtype = torch.float8_e4m3fn if cfg.kv_cache_dtype == KvCacheDtype.fp8 else model.dtype
        per_block = Runner.cache_bytes_per_block(model, cfg.block_size, cache_dtype)
        num_blocks = self._agree(_cache_bytes(cfg, model.device) // per_block, model.device)
        self.pool = BlockPool(num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.pool, cfg.slots, cfg.max_batched_tokens)
        self.runner = Runner(
            model,
            group,
            choose_attention(cfg.attention, model.device),
            num_blocks,
            cfg.block_size,
            cfg.slots,
            cfg.max_batched_tokens,
            cfg.cuda_graphs,
            cfg.compile,
            cache_dtype,
        )
        self.sequences: dict[int, Sequence] = {}
        self.pending: list[Event] = []  # events decided outside a step (refusals, aborts)
        self.inflight: tuple[str, list[Sequence], Callable[[], list[int]]] | None = None  # launched, not yet read
        # steps, tokens, the host's seconds in them, and of those the seconds it waited for the GPU
        self.totals = {kind: [0, 0, 0.0, 0.0] for kind in ("decode", "mixed")}

    def _agree(self, blocks: int, device: torch.device) -> int:
        """Every rank of a replica schedules alike, so all must have as many blocks as the smallest."""
        if self.group is None:
            return blocks
        count = torch.tensor([blocks], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        return int(count.item())

    def describe(self) -> str:
        r, cfg = self.runner, self.cfg
        tokens = self.pool.capacity * cfg.block_size
        shards = [f"{r.heads} heads a rank" if r.tp else "", "experts split" if r.ep else ""]
        return (
            f"up to {cfg.slots} requests at a time, {cfg.max_batched_tokens} tokens a step, paged KV cache of "
            f"{tokens} tokens ({str(r.k_cache.dtype).removeprefix('torch.')}, {cfg.block_size}-token blocks, "
            f"prefix caching {'on' if cfg.prefix_caching else 'off'}), "
            f"attention via {r.attention.name}, experts via {self._experts_path()}, "
            f"CUDA graphs {'on' if r.cuda_graphs else 'off'}, torch.compile {'on' if r.compiled else 'off'}"
            + "".join(f", {x}" for x in shards if x)
        )

    def _experts_path(self) -> str:
        if self.runner.packed:
            return f"MXFP4 through {self.runner.layers[0].mlp.experts.path}"
        return "grouped_mm" if self.runner.grouped else "an expert loop"

    # -- the Backend interface ------------------------------------------------------------------------------

    def add(self, work: list[Work]) -> None:
        for w in work:
            seq = Sequence.of(w, self.context)
            if not w.prompt or min(w.prompt) < 0 or max(w.prompt) >= self.runner.vocab:
                self.pending.append(Event(w.rid, [], f"error: prompt token ids must be in [0, {self.runner.vocab})"))
                continue
            if seq.max_new_tokens < 1:
                self.pending.append(
                    Event(
                        w.rid,
                        [],
                        f"error: {len(w.prompt)} prompt tokens leave no room in the "
                        f"model's context of {self.context} tokens",
                    )
                )
                continue
            if not self.scheduler.fits(seq):
                tokens = self.pool.capacity * self.pool.block_size
                self.pending.append(
                    Event(
                        w.rid,
                        [],
                        f"error: {len(w.prompt)} prompt tokens + {w.max_new_tokens} new "
                        f"tokens do not fit the KV cache of {tokens} tokens (engine.cache_gib)",
                    )
                )
                continue
            self.sequences[w.rid] = seq
            self.scheduler.add(seq)

    def abort(self, rids: Iterable[int]) -> None:
        for rid in rids:
            seq = self.sequences.pop(rid, None)
            if seq is None:
                continue
            self.scheduler.finish(seq)
            self.pending.append(Event(rid, [], "cancelled"))

    def busy(self) -> bool:
        return bool(self.sequences or self.pending or self.inflight)

    def room(self) -> int:
        """Enough queued to refill every slot at once."""
        return max(0, 2 * self.cfg.slots - len(self.sequences))

    def step(self, publish: Callable[[list[Event]], None], aborted: Callable[[], set[int]] | None = None) -> None:
        """Launch the next step, then read the one before it: its tokens become events."""
        events, self.pending = self.pending, []
        start = time.perf_counter()
        step = self.scheduler.schedule()
        launched = None
        if step.sequences:
            decode_only = step.decode_only
            kind = "decode" if decode_only else "mixed"
            logits = self.runner.run(step.sequences, step.counts, decode_only)
            due = self.scheduler.computed(step)
            wait = self.runner.keep(self._next_tokens(logits, due))
            for row, seq in enumerate(due):
                seq.tokens.append(PENDING)
                seq.unknown += 1
                seq.out_row = row
            launched = (kind, due, wait)
            self.totals[kind][0] += 1
            self.totals[kind][1] += sum(step.counts)
        if self.inflight is not None:
            kind, due, wait = self.inflight
            waited = time.perf_counter()
            tokens = wait()
            self.totals[kind][3] += time.perf_counter() - waited
            events += self._advance(due, tokens)
        self.inflight = launched
        if launched:
            self.totals[launched[0]][2] += time.perf_counter() - start
        if events:
            publish(events)

    def close(self) -> None:
        self.runner.close()

    def stats(self) -> dict[str, int]:
        pool = self.pool
        return {
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "kv_cache_blocks_used": pool.capacity - pool.num_free(),
            "kv_cache_blocks": pool.capacity,
            "preemptions": self.scheduler.preemptions,
            "prefix_cache_hit_tokens": pool.hits,
            "prefix_cache_query_tokens": pool.queries,
        }

    def summary(self) -> str:
        """What the steps did: how many of each kind, their tokens and the host's time (how much of it waiting for
        the GPU: the rest is scheduling and bookkeeping, which the GPU may wait for); preemptions; prefix-cache
        hits."""
        parts = [
            f"{kind} steps {n} ({tokens} tokens, {seconds:.1f} s, {seconds / max(n, 1) * 1e3:.1f} ms a step, "
            f"{waited / max(n, 1) * 1e3:.1f} ms of it waiting for the GPU)"
            for kind, (n, tokens, seconds, waited) in self.totals.items()
        ]
        hits = self.pool.hits / max(self.pool.queries, 1)
        preemptions = self.scheduler.preemptions
        return f"engine: {', '.join(parts)}; {preemptions} preemptions; prefix cache {hits:.0%} of prompt tokens"

    # -- tokens ---------------------------------------------------------------------------------------------

    def _next_tokens(self, logits: torch.Tensor, due: list[Sequence]) -> torch.Tensor:
        """On the device, without waiting for it: every parameter is known on the host. NO_TOKEN where a row's
        logits hold a NaN: argmax, greedy or over the sampler's noisy logits, picks a NaN wherever there is one, so
        the chosen logit alone tells (R values read, not the whole vocabulary again)."""
        tokens = logits.argmax(-1) if all(seq.sampling.temperature == 0 for seq in due) else self._sampled(logits, due)
        return torch.where(logits.gather(-1, tokens[:, None])[:, 0].isnan(), NO_TOKEN, tokens)

    def _sampled(self, logits: torch.Tensor, due: list[Sequence]) -> torch.Tensor:
        def column(values, dtype) -> torch.Tensor:
            return self.runner.to_device(np.array(list(values), dtype=dtype))

        temperature = column((s.sampling.temperature for s in due), np.float32)
        top_p = column((s.sampling.top_p for s in due), np.float32)
        seeds = column((s.sampling.seed for s in due), np.int64)
        positions = column((len(s.tokens) for s in due), np.int64)
        cut = [i for i, s in enumerate(due) if s.sampling.top_p < 1]
        return sample(logits, temperature, top_p, seeds, positions, column(cut, np.int64) if cut else None)

    def _advance(self, due: list[Sequence], tokens: list[int]) -> list[Event]:
        """A step's tokens, read: each fills its sequence's oldest PENDING place, unless the sequence has ended
        meanwhile (aborted, or ended by its token of the step before)."""
        events = []
        now = time.perf_counter()
        for seq, token in zip(due, tokens):
            if self.sequences.get(seq.rid) is not seq:
                continue
            at = len(seq.tokens) - seq.unknown
            if seq.first_token is None:
                seq.first_token = now
            if token == NO_TOKEN:
                made, reason = (
                    [],
                    (
                        f"error: the model's logits were NaN (not a number) at new token {at + 1 - seq.prompt_len}: "
                        "the checkpoint or a kernel is broken, and no token can be chosen"
                    ),
                )
            else:
                seq.tokens[at] = token
                seq.unknown -= 1
                stop = {} if seq.sampling.ignore_eos else self.stop
                made, reason = [token], finish_reason(token, at + 1 - seq.prompt_len, seq.max_new_tokens, stop)
            if reason is None:
                events.append(Event(seq.rid, made))
                continue
            if token == NO_TOKEN:
                self.pool.forget(seq.blocks)
            self.scheduler.finish(seq)
            del self.sequences[seq.rid]
            events.append(Event(seq.rid, made, reason, seq.admitted - seq.arrived, seq.first_token - seq.admitted))
        return events


def _cache_bytes(cfg: EngineConfig, device: torch.device) -> int:
    """engine.cache_gib, else on GPU what is free after loading less CACHE_HEADROOM_BYTES."""
    if cfg.cache_gib is not None:
        return int(cfg.cache_gib * 2**30)
    if device.type != "cuda":
        return CPU_CACHE_BYTES
    gc.collect()  # an engine dropped before this one holds its cache until its reference cycles are collected
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0] - CACHE_HEADROOM_BYTES
    log(f"engine: {free / 2**30:.1f} GiB of GPU memory for the KV cache")
    return free
