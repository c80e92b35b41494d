"""The fast generation engine: the model's own weights through a lean forward of our own (in the style of
gpt-fast), with
  - a static KV cache of `slots` rows, one sequence a slot, written in place;
  - the decode step captured in CUDA graphs (one per power-of-two count of slots), so a step is one launch;
  - MoE experts as one grouped GEMM per projection over the tokens sorted by expert (torch's grouped_mm),
    with the SwiGLU clamp and the routing weights applied on the sorted rows;
  - decode attention through a Triton kernel of ours (parallel/engine/kernels/decode_attention.py) that reads each sequence's
    live keys only, within its window on sliding layers;
  - a KV cache sized to the memory left after loading: fewer sequences at a time when long ones do not fit;
  - continuous batching: a row that finishes frees its slot, and the next waiting request is prefilled into it.
It runs every layout but pipelines: a replica of one rank, or one spanning ranks with tensor-parallel
attention and/or expert-parallel experts (this rank's shards, partial sums all-reduced in the replica).
The math is transformers' GptOss, step for step (RMSNorm, YaRN rotary, attention with sinks and sliding
windows, top-k router with softmax over the chosen experts, clamped SwiGLU); tests hold it to the plain path.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.config import GenerationConfig
from parallel.engine.forward import GROUPED_MM, attend, embed, experts_block, local, qkv, vocab_shard_start
from parallel.engine.interface import Completion, Timing, cut
from parallel.log import warn

# A prefill chunk holds B x heads x chunk x T attention scores in float32: chunks are cut to keep them under
# this many bytes, so a long prompt is prefilled in pieces rather than running out of memory.
PREFILL_SCORES_BYTES = 2**30
# Prompts admitted together: at most this many tokens (padded) in one prefill.
PREFILL_TOKENS = 16384
# GPU memory the KV cache leaves free: prefill activations (PREFILL_TOKENS rows through the experts, one chunk
# of scores), logits, the CUDA graphs' pools, NCCL's buffers.
CACHE_HEADROOM_BYTES = 6 * 2**30


def _buckets(slots: int) -> list[int]:
    sizes, b = [], 1
    while b < slots:
        sizes.append(b)
        b *= 2
    return [*sizes, slots]


class Engine:
    """Generates like generation.generate, and takes new rows while it runs (`joins`). `group`: the replica's process group when the replica spans ranks (tp and/or ep, no pp). Every rank of
    the replica runs the same loop on the same tokens: attention heads and experts are this rank's shards,
    and the partial sums after o_proj (tp) and after the experts (ep) are all-reduced in the group."""

    joins = True

    def __init__(self, model, slots: int, cuda_graphs: bool = True, compile: bool = True, group=None,
                 attention: str = "auto", cache_gib: float | None = None):
        config = model.config
        self.model, self.layers = model, model.model.layers
        self.device, self.dtype = model.device, model.dtype
        self.slots, self.group, self.cache_gib = slots, group, cache_gib
        self.rows = slots  # the slots the cache holds now: fewer than `slots` when long sequences do not all fit
        self.head_dim = config.head_dim
        attn = self.layers[0].self_attn
        self.heads = local(attn.q_proj.weight).shape[0] // self.head_dim  # this rank's share under tp
        self.kv_heads = local(attn.k_proj.weight).shape[0] // self.head_dim
        self.tp = self.heads < config.num_attention_heads
        if not isinstance(getattr(self.layers[0].mlp.experts, "gate_up_proj", None), torch.Tensor):
            raise NotImplementedError("the engine runs float experts; MXFP4 experts run natively on the plain path")
        local_experts = local(self.layers[0].mlp.experts.gate_up_proj).shape[0]
        self.ep = local_experts < config.num_local_experts
        # transformers shards the experts in order along the expert dimension of the replica's ranks.
        self.first_expert = dist.get_rank(group) * local_experts if self.ep else 0
        # lm_head may be split by vocabulary (transformers' tp plan): its module gathers the logits. The embedding
        # may be split the same way (transformers >= 5.24): each rank looks up its rows and the replica sums them.
        self.embedding = local(model.model.embed_tokens.weight)
        self.vocab_start = vocab_shard_start(config.vocab_size, self.embedding.shape[0], group)
        self.top_k = config.num_experts_per_tok
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha
        self.windows = [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
        # grouped_mm runs bf16 on Hopper and anything on CPU; elsewhere a loop over the experts hit.
        self.grouped = GROUPED_MM is not None and (self.device.type == "cpu" or self.dtype == torch.bfloat16)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.grouped
        self.weights = [self._weights(i) for i in range(len(self.layers))]
        # The decode step's pieces compiled (fusing the norms, rotary, softmax, SwiGLU): GPU and grouped_mm only.
        self.compile = compile and self.cuda_graphs
        self.kernel = _decode_kernel(attention, self.device)
        if self.kernel:
            from parallel.engine.kernels.decode_attention import decode_attention
            self._decode_attention = decode_attention
        if self.compile:
            self._compiled = (torch.compile(qkv), torch.compile(attend), torch.compile(experts_block))
        self.max_len = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> str:
        moe = "grouped_mm" if self.grouped else "expert loop"
        shards = [f"{self.heads} heads a rank" if self.tp else "", "experts split" if self.ep else ""]
        attention = "Triton kernel (live keys only)" if self.kernel else "torch (every cached position)"
        return (f"{self.slots} slots, KV cache for {self.max_len} tokens, decode attention via {attention}, "
                f"experts via {moe}, CUDA graphs "
                f"{'on' if self.cuda_graphs else 'off'}, torch.compile {'on' if self.compile else 'off'}"
                + "".join(f", {x}" for x in shards if x))

    # -- cache and graphs ---------------------------------------------------------------------------------

    def reserve(self, max_len: int) -> None:
        """A cache for sequences of max_len tokens, as many of them as fit (up to `slots`); growing it drops the
        graphs captured for the old. One spare position at the end, which no sequence reaches, takes the writes
        of graph warm-ups. Call it while no sequence lives in the cache."""
        max_len = -(-(max_len + 1) // 256) * 256
        if max_len <= self.max_len:
            return
        self.graphs.clear()
        self.k_cache = self.v_cache = None
        per_row = 2 * len(self.layers) * self.kv_heads * max_len * self.head_dim * self.dtype.itemsize
        budget = self._cache_budget()
        rows = min(self.slots, budget // per_row)
        if rows < 1:
            raise MemoryError(f"engine: the KV cache of one {max_len}-token sequence needs {per_row / 2**30:.2f} GiB, "
                              f"{budget / 2**30:.2f} GiB is available (engine.cache_gib; or lower generation.max_new_tokens)")
        if rows < self.slots:
            warn(f"engine: {self.slots} sequences of {max_len} tokens need {self.slots * per_row / 2**30:.1f} GiB of KV "
                 f"cache, {budget / 2**30:.1f} GiB is available: {rows} decode at a time")
        shape = (len(self.layers), rows, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.max_len, self.rows = max_len, rows

    def _cache_budget(self) -> int:
        """Bytes for the KV cache: engine.cache_gib, else on GPU what is free less CACHE_HEADROOM_BYTES."""
        if self.cache_gib is not None:
            return int(self.cache_gib * 2**30)
        if self.device.type != "cuda":
            return 2**62
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)[0] - CACHE_HEADROOM_BYTES

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of one new token for slots [0, len(tokens)), at their positions, through a graph if on."""
        n = tokens.shape[0]
        if not self.cuda_graphs:
            return self.forward(tokens[:, None], slice(0, n), positions, self.max_len)
        bucket = next(b for b in _buckets(self.rows) if b >= n)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, static_tokens, static_positions, logits = self.graphs[bucket]
        static_tokens[:n].copy_(tokens)
        static_positions[:n].copy_(positions)
        graph.replay()
        return logits[:n]

    def _capture(self, bucket: int):
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
        # Warming up runs the step for real: its keys go to the spare last position, not over a live sequence's.
        positions = torch.full((bucket,), self.max_len - 1, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph: lazy inits and autotuning happen here
            for _ in range(2):
                self.forward(tokens[:, None], slice(0, bucket), positions, self.max_len, self.compile)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.forward(tokens[:, None], slice(0, bucket), positions, self.max_len, self.compile)
        return graph, tokens, positions, logits

    # -- the model ----------------------------------------------------------------------------------------

    def _weights(self, i: int) -> tuple[tuple, tuple, tuple]:
        """Layer i's local tensors for qkv, attend and experts_block: passing tensors, not modules, lets one
        compiled graph serve every layer."""
        layer = self.layers[i]
        attn, mlp, experts = layer.self_attn, layer.mlp, layer.mlp.experts
        projections = tuple(map(local, (layer.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias,
                                 attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias)))
        attention = (local(attn.sinks), attn.scaling, local(attn.o_proj.weight))
        moe = (local(attn.o_proj.bias), local(layer.post_attention_layernorm.weight), local(mlp.router.weight),
               local(mlp.router.bias), *map(local, (experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj,
                                                      experts.down_proj_bias)),
               self.first_expert, self.top_k, self.limit, self.alpha, self.grouped)
        return projections, attention, moe

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, rows, start: torch.Tensor, kv_len: int, compiled: bool = False,
                take: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) after token take[b] (default: the last) of ids (B, T), for the cache rows `rows` (a
        slice, or a tensor of slot indices), whose first token sits at position start[b]. Writes the tokens'
        keys and values into the cache. `compiled`: the decode step's torch.compile'd pieces."""
        batch, width = ids.shape
        inner = self.model.model
        project, attention, moe_block = self._compiled if compiled else (qkv, attend, experts_block)
        eps = self.layers[0].input_layernorm.variance_epsilon
        x = embed(ids, self.embedding, self.vocab_start, self.model.config.vocab_size, self.group)
        positions = start[:, None] + torch.arange(width, device=ids.device)
        cos, sin = inner.rotary_emb(x, positions)
        kernel = self.kernel and width == 1 and isinstance(rows, slice)  # a decode step over slots [a, b)
        masks = {} if kernel else self._masks(positions, kv_len)
        lengths = start + 1  # the keys a sequence has in the cache once this step's are written (the kernel's)
        index = torch.arange(self.rows, device=ids.device)[rows] if isinstance(rows, slice) else rows
        for i in range(len(self.layers)):
            weights_qkv, weights_attend, weights_moe = self.weights[i]
            q, k, v = project(x, cos, sin, self.head_dim, eps, *weights_qkv)
            # The cache is written and the partial sums reduced here, outside the compiled pieces: no compiled
            # graph mutates the cache or holds a collective.
            self.k_cache[i][index[:, None], :, positions] = k.transpose(1, 2)
            self.v_cache[i][index[:, None], :, positions] = v.transpose(1, 2)
            if kernel:
                sinks, scaling, wo = weights_attend
                out = self._decode_attention(q[:, :, 0], self.k_cache[i][rows], self.v_cache[i][rows], lengths, sinks,
                                             scaling, self.windows[i])
                out = F.linear(out.reshape(batch, 1, -1), wo)
            else:
                out = attention(q, self.k_cache[i][rows, :, :kv_len], self.v_cache[i][rows, :, :kv_len], masks[self.windows[i]], *weights_attend)
            if self.tp:
                dist.all_reduce(out, group=self.group)
            x, moe = moe_block(x, out, eps, *weights_moe)
            if self.ep:
                dist.all_reduce(moe, group=self.group)
            x = x + moe
        x = x[:, -1] if take is None else x[torch.arange(batch, device=ids.device), take]
        return self.model.lm_head(inner.norm(x))

    def _masks(self, positions: torch.Tensor, kv_len: int) -> dict[int | None, torch.Tensor]:
        """Additive masks (B, T, kv_len) for torch attention, one per window size: causal, and within the window."""
        keys = torch.arange(kv_len, device=positions.device)
        causal = keys <= positions[..., None]
        masks = {}
        for window in set(self.windows):
            allowed = causal if window is None else causal & (keys > positions[..., None] - window)
            masks[window] = torch.zeros(allowed.shape, dtype=torch.float32, device=positions.device).masked_fill_(~allowed, float("-inf"))
        return masks

    # -- continuous batching ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        gen: GenerationConfig,
        *,
        stop: dict[int, str],
        seed: int,
        on_step: Callable[[list[tuple[int, int]]], None] | None = None,
        cancelled: Callable[[], list[bool]] | None = None,
        incoming: Callable[[], list[tuple[list[int], int]]] | None = None,
    ) -> tuple[list[Completion], Timing]:
        """Like generation.generate, with continuous batching: up to `slots` rows decode together, and a row
        that ends hands its slot to the next prompt. `on_step` gets each step's (row, token) pairs; rows that
        `cancelled()` names end at once; `incoming()` hands over more (prompt, max_new_tokens) rows while it
        runs (a server's new requests), numbered on from the last. Every rank of a replica must see the same
        from `cancelled` and `incoming`. Timing.first_token_s is the mean over rows of their first token's time."""
        start = time.perf_counter()
        prompts, max_new_tokens = list(prompts), list(max_new_tokens)
        self.reserve(max(len(p) + n for p, n in zip(prompts, max_new_tokens)))
        generator = torch.Generator(self.device).manual_seed(seed)
        waiting = list(range(len(prompts)))
        tokens: list[list[int]] = [[] for _ in prompts]
        first: list[float] = [0.0] * len(prompts)
        slot_row: list[int | None] = [None] * self.slots
        next_token = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        position = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        alive = torch.zeros(self.slots, dtype=torch.long, device=self.device)  # a free slot's position stays put

        def finish(slot: int) -> None:
            slot_row[slot] = None
            alive[slot] = 0

        def emit(step: list[tuple[int, int]]) -> None:
            """Record each (slot, token) of a step; free the slots whose rows are finished."""
            if on_step:
                on_step([(slot_row[slot], token) for slot, token in step])
            for slot, token in step:
                row = slot_row[slot]
                if not tokens[row]:
                    first[row] = time.perf_counter() - start
                tokens[row].append(token)
                if token in stop or len(tokens[row]) >= max_new_tokens[row]:
                    finish(slot)

        while True:
            for prompt, limit in incoming() if incoming else []:
                prompts.append(prompt)
                max_new_tokens.append(limit)
                tokens.append([])
                first.append(0.0)
                waiting.append(len(prompts) - 1)
            if cancelled:
                gone = cancelled()
                waiting = [r for r in waiting if not gone[r]]
                for slot, row in enumerate(slot_row):
                    if row is not None and gone[row]:
                        finish(slot)
            busy = any(r is not None for r in slot_row)
            if not waiting and not busy:
                break
            if waiting and not busy:  # a row longer than the cache: grow it while no sequence lives in it
                self.reserve(len(prompts[waiting[0]]) + max_new_tokens[waiting[0]])
            free = [s for s in range(self.rows) if slot_row[s] is None]
            admitted = self._admit(waiting, free, prompts, max_new_tokens, slot_row) if waiting and free else {}
            if admitted:
                logits = self._prefill([prompts[r] for r in admitted.values()], list(admitted))
                chosen = self._sample(logits, gen, generator).tolist()
                for slot, token in zip(admitted, chosen):
                    position[slot], next_token[slot], alive[slot] = len(prompts[slot_row[slot]]), token, 1
                emit(list(zip(admitted, chosen)))
                continue
            live = max(s for s, r in enumerate(slot_row) if r is not None) + 1
            logits = self._decode(next_token[:live], position[:live])
            chosen = self._sample(logits, gen, generator)
            next_token[:live] = chosen
            position[:live] += alive[:live]
            emit([(slot, token) for slot, token in enumerate(chosen.tolist()) if slot_row[slot] is not None])
        completions = [cut(t, n, stop) for t, n in zip(tokens, max_new_tokens)]
        return completions, Timing(first_token_s=sum(first) / len(first), batch_s=time.perf_counter() - start)

    def _admit(self, waiting: list[int], free: list[int], prompts, limits, slot_row) -> dict[int, int]:
        """Waiting rows into free slots, in order, as many as one prefill holds and the cache fits (lowest slots
        first, so the decode graphs stay small)."""
        admitted: dict[int, int] = {}
        for slot in free:
            if not waiting or len(prompts[waiting[0]]) + limits[waiting[0]] >= self.max_len:
                break
            width = max(len(prompts[r]) for r in [*admitted.values(), waiting[0]])
            count = len(admitted) + 1
            if admitted and count * width > PREFILL_TOKENS:
                break
            admitted[slot] = waiting.pop(0)
            slot_row[slot] = admitted[slot]
        return admitted

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Right-padded prompts into their slots, in chunks of positions small enough for the attention scores;
        the logits after each one's last token. Padding writes keys past a prompt's end, which decoding
        overwrites before any query can see them."""
        width = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        rows = torch.tensor(slots, device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        chunk = max(16, min(width, PREFILL_SCORES_BYTES // (len(prompts) * self.heads * width * 4)))
        logits = None
        for begin in range(0, width, chunk):
            end = min(begin + chunk, width)
            start = torch.full((len(prompts),), begin, dtype=torch.long, device=self.device)
            out = self.forward(ids[:, begin:end], rows, start, end, take=(last - begin).clamp(0, end - begin - 1))
            ends_here = ((last >= begin) & (last < end))[:, None]
            logits = out if logits is None else torch.where(ends_here, out, logits)
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
        if gen.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
        if gen.top_p < 1:
            sorted_probs, index = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > gen.top_p
            probs = probs.scatter(-1, index, sorted_probs.masked_fill(outside, 0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_kernel(choice: str, device: torch.device) -> bool:
    """Whether decode attention runs through the Triton kernel: `auto` on GPU where triton is installed."""
    runs = importlib.util.find_spec("triton") is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if choice == "triton" and not runs:
        raise ValueError("engine.attention=triton needs triton and a GPU (or TRITON_INTERPRET=1 on CPU)")
    if choice == "auto" and device.type == "cuda" and not runs:
        warn("engine: triton is not installed; decode attention runs in torch, reading every cached position")
    return runs and (choice == "triton" or (choice == "auto" and device.type == "cuda"))


