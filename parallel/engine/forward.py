"""One gpt-oss layer as functions of tensors: the engine's forward, the same math as transformers' GptOss step
for step (RMSNorm, YaRN rotary, attention with sinks, top-k router with softmax over the chosen experts, clamped
SwiGLU). Passing tensors rather than modules lets one compiled graph serve every layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GptOssRMSNorm: normalised in float32, scaled by the weight, back in the input's dtype."""
    h = x.float()
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def local(t):
    """This rank's part of a parameter (transformers' tp/ep shards are DTensors); plain tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def vocab_shard_start(vocab: int, rows: int, group) -> int:
    """The first token id of this rank's embedding rows: whole (0), or split by vocabulary over the replica the way
    DTensor's Shard(0) splits it (chunks of ceil(vocab / ranks), the last one shorter)."""
    if rows == vocab:
        return 0
    ranks = dist.get_world_size(group)
    chunk = -(-vocab // ranks)
    start = dist.get_rank(group) * chunk
    if rows != min(chunk, vocab - start):
        raise NotImplementedError(
            f"embedding rows {rows} on this rank are not a Shard(0) split of {vocab} over {ranks} ranks"
        )
    return start


def embed(ids: torch.Tensor, weight: torch.Tensor, start: int, vocab: int, group) -> torch.Tensor:
    """Embeddings of ids. A vocabulary split over the replica: this rank holds rows [start, start + len(weight)),
    ids outside them give zeros here, and the partial lookups are summed over the replica."""
    if weight.shape[0] == vocab:
        return F.embedding(ids, weight)
    local_ids = ids - start
    inside = (local_ids >= 0) & (local_ids < weight.shape[0])
    x = F.embedding(local_ids.clamp(0, weight.shape[0] - 1), weight) * inside[..., None].to(weight.dtype)
    dist.all_reduce(x, group=group)
    return x


def qkv(x, cos, sin, head_dim: int, eps: float, norm, weight, bias, sizes: tuple[int, int, int]):
    """Queries, keys and values from one GEMM over q_proj, k_proj and v_proj stacked (`sizes` rows each)."""
    batch, width, _ = x.shape
    h = rms_norm(x, norm, eps)
    q, k, v = (
        t.reshape(batch, width, -1, head_dim).transpose(1, 2) for t in F.linear(h, weight, bias).split(sizes, -1)
    )
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


@torch.no_grad()
def stack_projections_(projections) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """One weight and bias for linear layers of the same input, their rows stacked, and each one's rows. Each
    layer's own tensors become views of them: one GEMM launch instead of several (at a decode step's few rows q,
    k and v each cost a launch and a split-K reduce), with no second copy of the weights. Layers already stacked
    (a second engine on the same model) are taken as they lie."""
    weights, biases = [local(p.weight) for p in projections], [local(p.bias) for p in projections]
    sizes = tuple(w.shape[0] for w in weights)
    weight, bias = _back_to_back(weights), _back_to_back(biases)
    if weight is not None and bias is not None:
        return weight, bias, sizes
    weight, bias = torch.cat(weights), torch.cat(biases)
    start = 0
    for p, rows in zip(projections, sizes):
        _point_at(p.weight, weight[start : start + rows])
        _point_at(p.bias, bias[start : start + rows])
        start += rows
    return weight, bias, sizes


def _back_to_back(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The parts as one tensor where they already lie one after another in one storage, else None."""
    storage, offset = parts[0].untyped_storage(), parts[0].storage_offset()
    for t in parts:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return parts[0].new_empty(0).set_(storage, parts[0].storage_offset(), (rows, *parts[0].shape[1:]))


def _point_at(param, view: torch.Tensor) -> None:
    """The parameter's (this rank's) values are now view's, which equal them."""
    (param._local_tensor if isinstance(param, DTensor) else param).data = view


def residual_norm(x, attended, eps: float, bo, norm):
    """The residual after attention, and its norm as (tokens, hidden) rows for the experts."""
    x = x + attended + bo
    return x, rms_norm(x, norm, eps).reshape(-1, x.shape[-1])


def experts_block(
    x,
    attended,
    eps: float,
    bo,
    norm,
    router_w,
    router_b,
    gate_up,
    gate_up_bias,
    down,
    down_bias,
    first_expert: int,
    top_k: int,
    limit: float,
    alpha: float,
    grouped: bool,
):
    """The residual after attention, and the experts' output for it (under ep, this rank's experts' part)."""
    x, h = residual_norm(x, attended, eps, bo, norm)
    return x, experts(
        h, router_w, router_b, gate_up, gate_up_bias, down, down_bias, first_expert, top_k, limit, alpha, grouped
    ).view_as(x)


def packed_experts_block(residual_norm, combine, x, attended, eps: float, bo, norm, router_w, router_b, packed):
    """experts_block for experts kept in MXFP4 (parallel/engine/mxfp4.py): the module knows its share and runs
    outside the compiled code (dynamo does not trace triton_kernels' launchers; the step's CUDA graph holds it),
    all but the sum of each token's routes (`combine`)."""
    x, h = residual_norm(x, attended, eps, bo, norm)
    return x, packed(h, router_w, router_b, combine).view_as(x)


def experts(
    x,
    router_w,
    router_b,
    gate_up,
    gate_up_bias,
    down,
    down_bias,
    first_expert: int,
    top_k: int,
    limit: float,
    alpha: float,
    grouped: bool,
):
    """Each token through its top-k experts (softmax over the chosen k, as GptOssTopKRouter): rows sorted by
    expert, one grouped GEMM per projection, then each token's rows weighted and summed. This rank holds the
    experts [first_expert, first_expert + len(gate_up)); rows routed elsewhere sort last and count zero."""
    top, chosen = torch.topk(F.linear(x, router_w, router_b), top_k, dim=-1)
    weights = torch.softmax(top, dim=1, dtype=top.dtype).reshape(-1)
    local = gate_up.shape[0]
    flat = chosen.reshape(-1) - first_expert
    here = (flat >= 0) & (flat < local)
    flat = torch.where(here, flat, local)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    expert = flat[order].clamp(max=local - 1)
    rows = x[token]
    if grouped:
        counts = torch.zeros(local + 1, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat.int(), torch.ones_like(flat, dtype=torch.int32)
        )
        offsets = torch.cumsum(counts[:local], 0, dtype=torch.int32)
        hidden = swiglu(GROUPED_MM(rows, gate_up, offs=offsets) + gate_up_bias[expert], limit, alpha)
        out = GROUPED_MM(hidden, down, offs=offsets) + down_bias[expert]
    else:  # one matmul pair per expert hit (a host sync each): float32 on GPU, or no grouped_mm
        out = torch.zeros_like(rows)
        for e in flat[order].unique().tolist():
            hit = flat[order] == e
            if e < local:
                out[hit] = swiglu(rows[hit] @ gate_up[e] + gate_up_bias[e], limit, alpha) @ down[e] + down_bias[e]
    # rows of other ranks' experts (past the last offset) hold whatever the GEMM left there: zero them.
    out = torch.where(here[order, None], out * weights[order, None].to(out.dtype), 0)
    return torch.zeros_like(x).index_add_(0, token, out)


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved gate/up columns."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def layer_weights(layer, config, first_expert: int, grouped: bool, packed: bool) -> tuple[tuple, tuple, tuple]:
    """One layer's local tensors for qkv, attention and experts_block (packed_experts_block: the experts module)."""
    attn, mlp, experts = layer.self_attn, layer.mlp, layer.mlp.experts
    projections = (local(layer.input_layernorm.weight), *stack_projections_((attn.q_proj, attn.k_proj, attn.v_proj)))
    attention = (local(attn.sinks), attn.scaling, local(attn.o_proj.weight))
    norm_router = tuple(
        map(local, (attn.o_proj.bias, layer.post_attention_layernorm.weight, mlp.router.weight, mlp.router.bias))
    )
    if packed:
        return projections, attention, (*norm_router, experts)
    moe = (
        *norm_router,
        *map(local, (experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias)),
        first_expert,
        config.num_experts_per_tok,
        config.swiglu_limit,
        config.swiglu_alpha,
        grouped,
    )
    return projections, attention, moe
