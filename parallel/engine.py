"""The fast generation engine: the model's own weights through a lean forward of our own (in the style of
gpt-fast), with
  - a static KV cache of `slots` rows, one sequence a slot, written in place;
  - the decode step captured in CUDA graphs (one per power-of-two count of slots), so a step is one launch;
  - MoE experts as one grouped GEMM per projection over the tokens sorted by expert (torch's grouped_mm),
    with the SwiGLU clamp and the routing weights applied on the sorted rows;
  - continuous batching: a row that finishes frees its slot, and the next waiting request is prefilled into it.
It runs one replica that holds the whole model (data-parallel layouts); other layouts use `generate`.
The math is transformers' GptOss, step for step (RMSNorm, YaRN rotary, attention with sinks and sliding
windows, top-k router with softmax over the chosen experts, clamped SwiGLU); tests hold it to the plain path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

from parallel.config import EngineConfig, GenerationConfig
from parallel.generation import Completion, Timing, _cut
from parallel.layout import Layout
from parallel.log import log

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# A prefill forward holds B x heads x T x T attention scores in float32: keep them under this many bytes.
PREFILL_SCORES_BYTES = 2**30
PREFILL_TOKENS = 16384


def _buckets(slots: int) -> list[int]:
    sizes, b = [], 1
    while b < slots:
        sizes.append(b)
        b *= 2
    return [*sizes, slots]


class Engine:
    def __init__(self, model, slots: int, cuda_graphs: bool = True, compile: bool = True):
        config = model.config
        self.model, self.layers = model, model.model.layers
        self.device, self.dtype = model.device, model.dtype
        self.slots = slots
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.top_k = config.num_experts_per_tok
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha
        self.windows = [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
        # grouped_mm runs bf16 on Hopper and anything on CPU; elsewhere a loop over the experts hit.
        self.grouped = GROUPED_MM is not None and (self.device.type == "cpu" or self.dtype == torch.bfloat16)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.grouped
        self.weights = [self._weights(i) for i in range(len(self.layers))]
        # The decode step's pieces compiled (fusing the norms, rotary, softmax, SwiGLU): GPU and grouped_mm only.
        self.compile = compile and self.cuda_graphs
        if self.compile:
            self._compiled = (torch.compile(_qkv), torch.compile(_attend_and_experts))
        self.max_len = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> str:
        moe = "grouped_mm" if self.grouped else "expert loop"
        return (f"{self.slots} slots, KV cache for {self.max_len} tokens, experts via {moe}, CUDA graphs "
                f"{'on' if self.cuda_graphs else 'off'}, torch.compile {'on' if self.compile else 'off'}")

    # -- cache and graphs ---------------------------------------------------------------------------------

    def reserve(self, max_len: int) -> None:
        """A cache for sequences of max_len tokens; growing it drops the graphs captured for the old. One spare
        position at the end, which no sequence reaches, takes the writes of graph warm-ups."""
        max_len = -(-(max_len + 1) // 256) * 256
        if max_len <= self.max_len:
            return
        self.graphs.clear()
        self.k_cache = self.v_cache = None
        torch.cuda.empty_cache() if self.device.type == "cuda" else None
        shape = (len(self.layers), self.slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.max_len = max_len

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of one new token for slots [0, len(tokens)), at their positions, through a graph if on."""
        n = tokens.shape[0]
        if not self.cuda_graphs:
            return self.forward(tokens[:, None], slice(0, n), positions, self.max_len)[:, -1]
        bucket = next(b for b in _buckets(self.slots) if b >= n)
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
            logits = self.forward(tokens[:, None], slice(0, bucket), positions, self.max_len, self.compile)[:, -1]
        return graph, tokens, positions, logits

    # -- the model ----------------------------------------------------------------------------------------

    def _weights(self, i: int) -> tuple[tuple, tuple]:
        """Layer i's tensors for _qkv and _attend_and_experts: passing tensors, not modules, lets one compiled
        graph serve every layer."""
        layer = self.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, attn.q_proj.weight, attn.q_proj.bias,
               attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias)
        rest = (attn.sinks, attn.scaling, attn.o_proj.weight, attn.o_proj.bias, layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.variance_epsilon, mlp.router.weight, mlp.router.bias,
                mlp.experts.gate_up_proj, mlp.experts.gate_up_proj_bias, mlp.experts.down_proj, mlp.experts.down_proj_bias,
                self.top_k, self.limit, self.alpha, self.grouped)
        return qkv, rest

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, rows, start: torch.Tensor, kv_len: int, compiled: bool = False) -> torch.Tensor:
        """Logits for ids (B, T) of the cache rows `rows` (a slice, or a tensor of slot indices), whose first
        token sits at position start[b]. Writes the tokens' keys and values into the cache. `compiled`: the
        decode step's torch.compile'd pieces (one shape a bucket)."""
        batch, width = ids.shape
        inner = self.model.model
        qkv, rest = (self._compiled if compiled else (_qkv, _attend_and_experts))
        x = inner.embed_tokens(ids)
        positions = start[:, None] + torch.arange(width, device=ids.device)
        cos, sin = inner.rotary_emb(x, positions)
        keys = torch.arange(kv_len, device=ids.device)
        causal = keys <= positions[..., None]  # (B, T, kv_len)
        masks = {}
        for window in set(self.windows):
            allowed = causal if window is None else causal & (keys > positions[..., None] - window)
            masks[window] = torch.zeros(allowed.shape, dtype=torch.float32, device=ids.device).masked_fill_(~allowed, float("-inf"))
        index = torch.arange(self.slots, device=ids.device)[rows] if isinstance(rows, slice) else rows
        for i in range(len(self.layers)):
            weights_qkv, weights_rest = self.weights[i]
            q, k, v = qkv(x, cos, sin, self.head_dim, *weights_qkv)
            # The cache is written here, outside the compiled pieces, so that no compiled graph mutates it.
            self.k_cache[i][index[:, None], :, positions] = k.transpose(1, 2)
            self.v_cache[i][index[:, None], :, positions] = v.transpose(1, 2)
            x = rest(x, q, self.k_cache[i][rows, :, :kv_len], self.v_cache[i][rows, :, :kv_len], masks[self.windows[i]], *weights_rest)
        return self.model.lm_head(inner.norm(x))

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
    ) -> tuple[list[Completion], Timing]:
        """Like generation.generate, with continuous batching: up to `slots` rows decode together, and a row
        that ends hands its slot to the next prompt. `on_step` gets each step's (row, token) pairs; rows that
        `cancelled()` names end at once. Timing.first_token_s is the mean over rows of their first token's time."""
        start = time.perf_counter()
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

        while waiting or any(r is not None for r in slot_row):
            if cancelled:
                gone = cancelled()
                waiting = [r for r in waiting if not gone[r]]
                for slot, row in enumerate(slot_row):
                    if row is not None and gone[row]:
                        finish(slot)
            free = [s for s, r in enumerate(slot_row) if r is None]
            if waiting and free:
                admitted = self._admit(waiting, free, prompts, slot_row)
                logits = self._prefill([prompts[r] for r in admitted.values()], list(admitted))
                chosen = self._sample(logits, gen, generator).tolist()
                for slot, token in zip(admitted, chosen):
                    position[slot], next_token[slot], alive[slot] = len(prompts[slot_row[slot]]), token, 1
                emit(list(zip(admitted, chosen)))
                continue
            if not any(r is not None for r in slot_row):
                break
            live = max(s for s, r in enumerate(slot_row) if r is not None) + 1
            logits = self._decode(next_token[:live], position[:live])
            chosen = self._sample(logits, gen, generator)
            next_token[:live] = chosen
            position[:live] += alive[:live]
            emit([(slot, token) for slot, token in enumerate(chosen.tolist()) if slot_row[slot] is not None])
        completions = [_cut(t, n, stop) for t, n in zip(tokens, max_new_tokens)]
        return completions, Timing(first_token_s=sum(first) / len(first), batch_s=time.perf_counter() - start)

    def _admit(self, waiting: list[int], free: list[int], prompts, slot_row) -> dict[int, int]:
        """Waiting rows into free slots, as many as one prefill forward holds (lowest slots first, so the
        decode graphs stay small)."""
        admitted: dict[int, int] = {}
        for slot in free:
            if not waiting:
                break
            width = max(len(prompts[r]) for r in [*admitted.values(), waiting[0]])
            count = len(admitted) + 1
            if admitted and (count * width > PREFILL_TOKENS or count * self.heads * width * width * 4 > PREFILL_SCORES_BYTES):
                break
            admitted[slot] = waiting.pop(0)
            slot_row[slot] = admitted[slot]
        return admitted

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Right-padded prompts into their slots; the logits after each one's last token. Padding writes keys
        past a prompt's end, which decoding overwrites before any query can see them."""
        width = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        rows = torch.tensor(slots, device=self.device)
        logits = self.forward(ids, rows, torch.zeros(len(prompts), dtype=torch.long, device=self.device), width)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return logits[torch.arange(len(prompts), device=self.device), last]

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


def choose_engine(model, cfg: EngineConfig, layout: Layout) -> Engine | None:
    """The engine where it runs and is wanted (plan_model already refused engine.mode=always where it cannot run);
    the log says which path generates."""
    if cfg.mode == "never" or layout.replica_size > 1 or (cfg.mode == "auto" and model.device.type != "cuda"):
        why = {"never": "engine.mode=never"}.get(cfg.mode) or (
            f"the engine runs replicas of one rank, not {layout}" if layout.replica_size > 1 else "engine.mode=auto uses it on GPU only")
        log(f"generation: plain model.generate ({why})")
        return None
    engine = Engine(model, cfg.slots, cfg.cuda_graphs, cfg.compile)
    log(f"generation: the engine ({engine.describe()})")
    return engine


# -- one layer, as functions of tensors (compiled for decoding) ------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GptOssRMSNorm: normalised in float32, scaled by the weight, back in the input's dtype."""
    h = x.float()
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _qkv(x, cos, sin, head_dim: int, norm, eps, wq, bq, wk, bk, wv, bv):
    batch, width, _ = x.shape
    h = _rms_norm(x, norm, eps)
    q, k, v = (F.linear(h, w, b).view(batch, width, -1, head_dim).transpose(1, 2) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _attend_and_experts(x, q, keys, values, mask, sinks, scaling, wo, bo, norm, eps, router_w, router_b,
                        gate_up, gate_up_bias, down, down_bias, top_k: int, limit: float, alpha: float, grouped: bool):
    """The rest of a layer after the cache write: attention with sinks over the cache rows, then the experts."""
    batch, heads, width, head_dim = q.shape
    kv_heads = keys.shape[1]
    q = q.view(batch, kv_heads, heads // kv_heads, width, head_dim)
    scores = torch.einsum("bkgtd,bksd->bkgts", q, keys).float() * scaling + mask[:, None, None]
    sink = sinks.float().view(1, kv_heads, heads // kv_heads, 1, 1).expand(batch, -1, -1, width, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bkgts,bksd->bkgtd", probs.to(values.dtype), values)
    x = x + F.linear(out.reshape(batch, heads, width, head_dim).transpose(1, 2).reshape(batch, width, -1), wo, bo)
    h = _rms_norm(x, norm, eps).reshape(batch * width, -1)
    return x + _experts(h, router_w, router_b, gate_up, gate_up_bias, down, down_bias, top_k, limit, alpha, grouped).view_as(x)


def _experts(x, router_w, router_b, gate_up, gate_up_bias, down, down_bias, top_k: int, limit: float, alpha: float, grouped: bool):
    """Each token through its top-k experts (softmax over the chosen k, as GptOssTopKRouter): rows sorted by
    expert, one grouped GEMM per projection, then each token's rows weighted and summed."""
    top, chosen = torch.topk(F.linear(x, router_w, router_b), top_k, dim=-1)
    weights = torch.softmax(top, dim=1, dtype=top.dtype)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    expert = flat[order]
    rows = x[token]
    if grouped:
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device).scatter_add_(0, flat.int(), torch.ones_like(flat, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        hidden = _swiglu(GROUPED_MM(rows, gate_up, offs=offsets) + gate_up_bias[expert], limit, alpha)
        out = GROUPED_MM(hidden, down, offs=offsets) + down_bias[expert]
    else:  # one matmul pair per expert hit (a host sync each): float32 on GPU, or no grouped_mm
        out = torch.empty_like(rows)
        for e in expert.unique().tolist():
            hit = expert == e
            out[hit] = _swiglu(rows[hit] @ gate_up[e] + gate_up_bias[e], limit, alpha) @ down[e] + down_bias[e]
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


def _swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved gate/up columns."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)
