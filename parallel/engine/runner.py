"""A step's tensors and the model's forward over them: flat tokens (no padding) through the lean layer functions
of parallel/engine/forward.py, keys and values written into the paged cache, attention through it, logits only
where a sequence's next token is due. On GPU every step replays a CUDA graph (parallel/engine/graphs.py); the
layer pieces are compiled with dynamic shapes, so one compilation serves every graph's token count.

Under tp and ep every rank of the replica runs the same step on its shards: the partial sums after o_proj (tp)
and after the experts (ep) are all-reduced in the replica, a vocabulary split of the embedding is summed, and
lm_head's module gathers a vocabulary split of the logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.engine.attention import Attention
from parallel.engine.forward import (
    GROUPED_MM,
    embed,
    experts_block,
    layer_weights,
    local,
    packed_experts_block,
    qkv,
    residual_norm,
    vocab_shard_start,
)
from parallel.engine.graphs import StepGraphs, StepInputs, pinned
from parallel.engine.mxfp4 import Mxfp4Experts, combine_routes
from parallel.engine.scheduler import Sequence
from parallel.log import log


class Runner:
    def __init__(
        self,
        model,
        group,
        attention: Attention,
        num_blocks: int,
        block_size: int,
        slots: int,
        max_batched_tokens: int,
        cuda_graphs: bool,
        compile: bool,
        cache_dtype: torch.dtype,
    ):
        config = model.config
        self.model, self.group, self.attention = model, group, attention
        self.device, self.dtype = model.device, model.dtype
        self.block_size, self.slots = block_size, slots
        self.layers = model.model.layers
        self.head_dim, self.vocab = config.head_dim, config.vocab_size
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        self.windows = [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
        attn = self.layers[0].self_attn
        self.heads = local(attn.q_proj.weight).shape[0] // self.head_dim  # this rank's share under tp
        self.kv_heads = local(attn.k_proj.weight).shape[0] // self.head_dim
        self.tp = self.heads < config.num_attention_heads
        experts = self.layers[0].mlp.experts
        self.packed = isinstance(experts, Mxfp4Experts)
        if not self.packed and not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            raise NotImplementedError(
                "the engine runs float experts and its own MXFP4 ones, not transformers' native MXFP4 modules"
            )
        local_experts = local(experts.gate_up_proj_bias).shape[0]
        self.ep = local_experts < config.num_local_experts
        # transformers shards the experts in order along the expert dimension of the replica's ranks.
        first_expert = dist.get_rank(group) * local_experts if self.ep else 0
        self.embedding = local(model.model.embed_tokens.weight)
        self.vocab_start = vocab_shard_start(self.vocab, self.embedding.shape[0], group)
        # grouped_mm runs bf16 on Hopper and anything on CPU; elsewhere a loop over the experts hit.
        self.grouped = GROUPED_MM is not None and (self.device.type == "cpu" or self.dtype == torch.bfloat16)
        self.weights = [layer_weights(layer, config, first_expert, self.grouped, self.packed) for layer in self.layers]
        shape = (len(self.layers), num_blocks, block_size, self.kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and (self.grouped or self.packed)
        self.compiled = self.cuda_graphs and compile
        wrap = (lambda f: torch.compile(f, dynamic=True)) if self.compiled else (lambda f: f)
        moe = (
            partial(packed_experts_block, wrap(residual_norm), wrap(combine_routes))
            if self.packed
            else wrap(experts_block)
        )
        self.pieces = (wrap(qkv), moe)
        max_blocks = -(-config.max_position_embeddings // block_size)
        # The last step's tokens, where the next step's forward reads those the host has not seen yet.
        self.sampled = torch.zeros(slots + 1, dtype=torch.long, device=self.device)
        self.graphs = None
        if self.cuda_graphs:
            start = time.perf_counter()
            self.graphs = StepGraphs(
                self.forward, attention.decode, attention.varlen, slots, max_batched_tokens, max_blocks, self.device
            )
            self.graphs.capture_all()
            log(f"engine: {len(self.graphs.graphs)} CUDA graphs captured in {time.perf_counter() - start:.1f} s")

    @staticmethod
    def cache_bytes_per_block(model, block_size: int, cache_dtype: torch.dtype) -> int:
        config = model.config
        kv_heads = local(model.model.layers[0].self_attn.k_proj.weight).shape[0] // config.head_dim
        return 2 * config.num_hidden_layers * block_size * kv_heads * config.head_dim * cache_dtype.itemsize

    # -- the forward ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, ids, prev, positions, slot_mapping, attend, take=None) -> torch.Tensor:
        """Logits after the flat tokens `ids` (T,) at `positions`, whose keys and values go to cache rows
        `slot_mapping` (block * block_size + offset); only rows `take` when given. Where prev >= 0 the token is
        the last step's sampled[prev]. `attend(q, k_cache, v_cache, sinks, scaling, window)` is attention for
        this step's shape."""
        project, moe_block = self.pieces
        inner = self.model.model
        ids = torch.where(prev >= 0, self.sampled[prev.clamp(min=0)], ids)
        x = embed(ids[:, None], self.embedding, self.vocab_start, self.vocab, self.group)  # (T, 1, hidden)
        cos, sin = inner.rotary_emb(x, positions[:, None])
        for i, (w_qkv, (sinks, scaling, wo), w_moe) in enumerate(self.weights):
            q, k, v = project(x, cos, sin, self.head_dim, self.eps, *w_qkv)
            write_cache(self.k_cache[i], slot_mapping, k[:, :, 0])
            write_cache(self.v_cache[i], slot_mapping, v[:, :, 0])
            out = attend(q[:, :, 0], self.k_cache[i], self.v_cache[i], sinks, scaling, self.windows[i])
            out = F.linear(out.reshape(len(ids), 1, -1), wo)
            if self.tp:
                dist.all_reduce(out, group=self.group)
            x, moe = moe_block(x, out, self.eps, *w_moe)
            if self.ep:
                dist.all_reduce(moe, group=self.group)
            x = x + moe
        x = x[:, 0] if take is None else x[take, 0]
        return self.model.lm_head(inner.norm(x))

    def close(self) -> None:
        """The CUDA graphs freed, after the work they were given: graphs that captured NCCL collectives (tp, ep) and
        outlive the process group hang the process's exit (parallel/job.py's finish_job). Steps after this run
        eager."""
        if self.graphs is not None:
            torch.cuda.synchronize(self.device)
            self.graphs.release()
            self.graphs = None

    # -- one step -------------------------------------------------------------------------------------------

    def run(self, sequences: list[Sequence], counts: list[int], decode_only: bool) -> torch.Tensor:
        """Logits (R, vocab) for the sequences whose every known token the step computes, in order."""
        step = StepInputs.of(sequences, counts, self.block_size, decode_only)
        if self.graphs is not None:
            return self.graphs.run(step)
        ids, prev, positions, slots, take, cu, lens, tables = (
            self.to_device(a)
            for a in (step.ids, step.prev, step.positions, step.slots, step.take, step.cu, step.seq_lens, step.tables)
        )

        def attend(q, k_cache, v_cache, sinks, scaling, window):
            if decode_only:
                return self.attention.decode(q, k_cache, v_cache, tables, lens, sinks, scaling, window)
            return self.attention.varlen(q, k_cache, v_cache, cu, lens, tables, sinks, scaling, window)

        return self.forward(ids, prev, positions, slots, attend, None if decode_only else take)

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """Copied without waiting for the GPU's current work."""
        return pinned(a).to(self.device, non_blocking=True) if self.device.type == "cuda" else torch.from_numpy(a)

    def keep(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Hold a step's sampled tokens (R,) where the next step's forward reads them and start their copy to the
        host; returns the wait for them. The engine's NO_TOKEN (-1) is read as token 0 by the step launched after it,
        whose row the host then drops."""
        self.sampled[: len(tokens)].copy_(tokens.clamp(min=0))
        if self.device.type != "cuda":
            return tokens.tolist
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> list[int]:
            copied.synchronize()
            return host.tolist()

        return wait


def write_cache(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """`rows` (T, kv heads, head dim) into the cache rows `slots` of one layer's (blocks, block size, kv heads, head
    dim) cache, in the cache's type. fp8 is written as its bytes: torch's CPU index_copy_ takes no float8, and the
    bytes are the same copy on a GPU. Values past fp8's range are clamped to it, not made NaN."""
    flat = cache.view(-1, *rows.shape[1:])
    if cache.dtype == rows.dtype:
        flat.index_copy_(0, slots, rows)
        return
    limit = torch.finfo(cache.dtype).max
    flat.view(torch.uint8).index_copy_(0, slots, rows.clamp(-limit, limit).to(cache.dtype).view(torch.uint8))
