"""gpt-oss's MoE experts in MXFP4, as the checkpoints store them, never widened into a float copy.

The format (the published checkpoints; transformers' `convert_moe_packed_tensors` reads it): each projection
is `*_blocks` (E, out, in/32, 16) uint8, two E2M1 codes a byte, low nibble first, and `*_scales`
(E, out, in/32) uint8, one E8M0 exponent (bias 127) for each 32 inputs. gate_up's 2I outputs interleave gate
(even) and up (odd), as transformers' float layout (E, H, 2I) does; down is (E, I, H) once dequantized.

One layer's experts (`Mxfp4Experts`) run through one of two paths, both the math of parallel/engine/forward.py's
`experts` (top-k router with a softmax over the chosen k, clamped SwiGLU, routing weights):
  - triton_kernels (the triton repository's MoE library at tag v3.6.0, which needs triton 3.6) on CUDA in
    bf16: the weights are converted once to the layouts its Hopper kernels read, then `topk` routes, two
    `matmul_ogs` calls gather the tokens and run both projections (the SwiGLU fused into the first, the routing
    weights into the second), and `combine_routes` sums each token's rows. No host syncs and no value-dependent
    shapes: it captures in CUDA graphs.
  - a reference on any device: the layer's experts dequantized on the fly (one layer's worth of memory) and
    every local expert run over every token, weighted zero where the token did not choose it.
Under expert parallelism a module holds experts [first_expert, first_expert + local); routes to other ranks'
experts count zero, and the caller sums the ranks' partial outputs.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.integrations.mxfp4 import FP4_VALUES

from parallel.engine.forward import swiglu
from parallel.log import log, warn

# The triton release triton_kernels v3.6.0 was tagged with: its API moves with triton's (3.6 dropped the routing
# module, 3.7 renames matmul_ogs), so any other is refused rather than half-working.
TRITON_SERIES = "3.6."
PACKED = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
BIASES = ("gate_up_proj_bias", "down_proj_bias")
# Realistic E8M0 exponents for random experts: weights of magnitude 2^-9..2^-6 times E2M1's 0.5..6.
RANDOM_SCALES = (118, 122)
# Experts converted to triton_kernels' layouts at a time: a whole 120b layer at once takes several times its size
# in temporaries, more than is left beside the model on an 80 GB GPU.
EXPERTS_A_STEP = 8
# Zero bytes kept after each converted tensor. On Hopper, matmul_ogs' kernel loads a K tile's scales without a
# mask, and gpt-oss's K (2880) ends in half a tile (128): the last expert's last row of scales reads up to 64 bytes
# past the tensor. Whatever lies there scales codes masked to zero, harmless unless it is 0xFF (E8M0's NaN, which
# the kernel widens to inf): zero times inf is NaN, in the down projection NaN for every token routed to that expert
# (3 of the 24 layers of a random gpt-oss-20b in one probe), in gate_up a wrong finite value once the SwiGLU's clamp
# drops the NaN (tests/gpu/mxfp4_check.py's scale-tail check shows both on a GPU).
TAIL_BYTES = 4096


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, out, in/32, 16) blocks and (E, out, in/32) scales -> (E, in, out) weights in `dtype`, the values
    transformers' convert_moe_packed_tensors gives."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]), dim=-1).flatten(-2)
    torch.ldexp(values, scales.int()[..., None] - 127, out=values)
    return values.flatten(-2).transpose(-1, -2).contiguous()


def triton_kernels_problem() -> str | None:
    """Why triton_kernels cannot run MXFP4 experts here, or None when it can: installed, beside the triton release
    it was made for (its API moves with triton's: 3.6 dropped the routing module, 3.7 renames matmul_ogs)."""
    if importlib.util.find_spec("triton_kernels") is None:
        return "triton_kernels is not installed"
    import triton

    if not triton.__version__.startswith(TRITON_SERIES):
        return f"triton_kernels v3.6.0 needs triton {TRITON_SERIES}x, and triton {triton.__version__} is installed"
    return None


@functools.cache
def uses_triton_kernels(device_type: str, dtype: torch.dtype) -> bool:
    """Whether MXFP4 experts run through triton_kernels: on CUDA in bf16 where it can (said once, not once a
    layer); else through the slow reference path, with a warning on GPU saying why."""
    if device_type != "cuda" or dtype != torch.bfloat16:
        return False
    problem = triton_kernels_problem()
    if problem:
        warn(f"MXFP4 experts run through the slow reference path: {problem}")
        return False
    import triton

    log(f"MXFP4 experts through triton_kernels (v3.6.0) matmul_ogs, triton {triton.__version__}")
    return True


class Mxfp4Experts(nn.Module):
    """One layer's experts [first_expert, first_expert + local), packed, with float32 biases. Its parameters are
    named as the checkpoint's tensors, so from_pretrained loads them as they are. `prepare` picks the path once
    loaded; calling it then gives the (T, H) output for T flattened tokens."""

    def __init__(
        self, experts: int, hidden: int, inner: int, *, top_k: int, limit: float, alpha: float, first_expert: int = 0
    ):
        super().__init__()
        shapes = {"gate_up_proj": (experts, 2 * inner, hidden // 32), "down_proj": (experts, hidden, inner // 32)}
        for name, (e, out, groups) in shapes.items():
            self.register_parameter(f"{name}_blocks", _frozen(torch.empty(e, out, groups, 16, dtype=torch.uint8)))
            self.register_parameter(f"{name}_scales", _frozen(torch.empty(e, out, groups, dtype=torch.uint8)))
            self.register_parameter(f"{name}_bias", _frozen(torch.empty(e, out, dtype=torch.float32)))
        self.top_k, self.limit, self.alpha, self.first_expert = top_k, limit, alpha, first_expert
        self.kernel: _Kernel | None = None

    @classmethod
    def random_packed(
        cls, experts: int, hidden: int, inner: int, *, device, dtype: torch.dtype, first_expert: int = 0, **math
    ) -> Mxfp4Experts:
        """`experts` random experts (this rank's share, from first_expert on) built on `device`, ready to run on
        activations of `dtype`. `math`: top_k, limit, alpha."""
        with torch.device(device):
            module = cls(experts, hidden, inner, first_expert=first_expert, **math)
        module.fill_random_()
        module.prepare(dtype)
        return module

    @property
    def local(self) -> int:
        return self.gate_up_proj_bias.shape[0]

    @property
    def path(self) -> str:
        return "triton_kernels matmul_ogs" if self.kernel else "the reference (dequantized on the fly)"

    def localize_(self) -> None:
        """transformers shards the parameters by expert across a replica's ranks (DTensors, Shard(0) over a 1-D
        mesh): keep this rank's part, and where it starts."""
        sharded = self.gate_up_proj_bias
        if isinstance(sharded, DTensor):
            self.first_expert = sharded.device_mesh.get_local_rank() * sharded.to_local().shape[0]
            for name, param in list(self.named_parameters()):
                setattr(self, name, _frozen(param.to_local()))

    @torch.no_grad()
    def fill_random_(self) -> None:
        """Random codes with realistic scales and small biases, in place: model.load_format=dummy."""
        for name in PACKED:
            param = getattr(self, name)
            low, high = RANDOM_SCALES if name.endswith("_scales") else (0, 256)
            param.random_(low, high)
        for name in BIASES:
            getattr(self, name).normal_(std=0.02)

    def prepare(self, dtype: torch.dtype) -> None:
        """Once loaded, for activations of `dtype`: where triton_kernels runs, convert the packed weights to its
        layouts (each replaced, not copied beside: one layer's worth of memory at most, in passing)."""
        if uses_triton_kernels(self.gate_up_proj_blocks.device.type, dtype):
            self.kernel = _Kernel(self)

    def forward(
        self, h: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, combine=None
    ) -> torch.Tensor:
        """`combine`: combine_routes (the default), or the engine's compiled copy of it (one kernel, not three)."""
        if self.kernel:
            return self.kernel(h, F.linear(h, router_weight, router_bias), combine or combine_routes)
        return self.reference(h, router_weight, router_bias)

    def reference(self, h: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor) -> torch.Tensor:
        """The experts' output in h's dtype. The router runs in its weight's dtype (the model's), so a float32
        reference of a bf16 model routes exactly as the model does."""
        weights = self._routing_weights(F.linear(h.to(router_weight.dtype), router_weight, router_bias)).to(h.dtype)
        gate_up = dequantize(self.gate_up_proj_blocks, self.gate_up_proj_scales, h.dtype)
        down = dequantize(self.down_proj_blocks, self.down_proj_scales, h.dtype)
        gate_up_bias, down_bias = self.gate_up_proj_bias.to(h.dtype), self.down_proj_bias.to(h.dtype)
        out = torch.zeros_like(h)
        # Every expert over every token: no host sync, no shape that depends on the routing.
        for e in range(self.local):
            y = swiglu(h @ gate_up[e] + gate_up_bias[e], self.limit, self.alpha) @ down[e] + down_bias[e]
            out += y * weights[:, e, None]
        return out

    def _routing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, local): each token's softmax weight for the local experts among its top k, zero elsewhere."""
        top, chosen = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=1, dtype=top.dtype)
        local = chosen - self.first_expert
        here = (local >= 0) & (local < self.local)
        # Routes to other ranks' experts land in a spare last column, dropped.
        dense = torch.zeros(logits.shape[0], self.local + 1, dtype=weights.dtype, device=logits.device)
        return dense.scatter_(1, torch.where(here, local, self.local), weights)[:, :-1]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _Kernel:
    """One layer's local experts as triton_kernels reads them, and the call through topk + matmul_ogs."""

    def __init__(self, experts: Mxfp4Experts):
        from triton_kernels.matmul_ogs import FnSpecs, FusedActivation
        from triton_kernels.matmul_ogs_details.opt_flags import (
            update_opt_flags_constraints,
        )
        from triton_kernels.swiglu import swiglu_fn

        # One pass over K, as vLLM and SGLang set it on Hopper.
        update_opt_flags_constraints({"split_k": 1})
        self.local, self.first_expert, self.top_k = experts.local, experts.first_expert, experts.top_k
        self.gate_up, self.gate_up_precision = _kernel_weight(experts, "gate_up_proj")
        self.down, self.down_precision = _kernel_weight(experts, "down_proj")
        self.gate_up_bias, self.down_bias = experts.gate_up_proj_bias, experts.down_proj_bias
        # triton_kernels' swiglu is gpt-oss's: gate = even columns clamped above at limit, up = odd columns
        # clamped to +-limit, gate * sigmoid(alpha * gate) * (up + 1); fused on the gate_up GEMM's output.
        self.activation = FusedActivation(
            FnSpecs("swiglu", swiglu_fn, ("alpha", "limit"), reduction_n=2), (experts.alpha, experts.limit)
        )

    def __call__(self, h: torch.Tensor, logits: torch.Tensor, combine) -> torch.Tensor:
        from triton_kernels.matmul_ogs import matmul_ogs

        routing, gather, dispatch = self._route(logits)
        hidden = matmul_ogs(
            h,
            self.gate_up,
            self.gate_up_bias,
            routing,
            gather_indx=gather,
            precision_config=self.gate_up_precision,
            fused_activation=self.activation,
        )
        # The down projection's rows stay in expert order and `combine` sums each token's, rather than matmul_ogs'
        # own scatter and its reduce kernel (19 us at one token on an H100): the engine alone went from 265 to 299
        # tok/s at batch 1 (20b shape, one H100 80GB HBM3, random weights).
        rows = matmul_ogs(
            hidden, self.down, self.down_bias, routing, precision_config=self.down_precision, gammas=routing.gate_scal
        )
        return combine(rows, dispatch, self.top_k)

    def _route(self, logits: torch.Tensor):
        """Routing data over the local experts: each token's top k of all experts (softmax over those k, as
        GptOssTopKRouter), rows sorted by local expert; routes to other ranks' experts drop out (index -1)."""
        from triton_kernels.matmul_ogs import GatherIndx, RoutingData
        from triton_kernels.tensor import make_ragged_tensor_metadata
        from triton_kernels.topk import topk

        routes = topk(logits, self.top_k, apply_softmax=True)
        if self.local < logits.shape[-1]:
            counts, combine, dispatch = local_routes(routes.indx, self.first_expert, self.local)
        else:
            meta = routes.mask_metadata
            counts, combine, dispatch = meta.col_sum, meta.col_sorted_indx, meta.row_sorted_indx
        # combine: for each row in expert order, its route (token * k + j); dispatch: the inverse, -1 for routes
        # this rank does not run.
        ragged = make_ragged_tensor_metadata(counts, dispatch.shape[0])
        routing = RoutingData(routes.vals.flatten()[combine], counts, self.local, self.top_k, ragged)
        return routing, GatherIndx(combine, dispatch), dispatch


def combine_routes(rows: torch.Tensor, dispatch: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, H): each token's top_k routes summed (in float32, in route order) from `rows`, the experts' weighted
    outputs in expert order, route t * top_k + j being row dispatch[t * top_k + j]; a route this rank does not run
    (-1) counts zero, whatever its row holds."""
    picked = rows[dispatch.clamp(min=0)].view(-1, top_k, rows.shape[-1]).float()
    return torch.where(dispatch.view(-1, top_k, 1) >= 0, picked, 0).sum(1).to(rows.dtype)


def local_routes(indx: torch.Tensor, first_expert: int, local: int):
    """Routes (tokens, k) of global expert ids, over this rank's experts [first_expert, + local): the routes per
    local expert, combine and dispatch (int32), as triton_kernels' metadata gives them for all experts, in torch
    ops of fixed shapes (CUDA-graph safe, and checked on CPU)."""
    ids = indx.flatten().long() - first_expert
    here = (ids >= 0) & (ids < local)
    key = torch.where(here, ids, local)  # other ranks' routes sort last
    order = torch.argsort(key, stable=True)
    combine = torch.where(key[order] < local, order, -1).int()
    rows = torch.arange(len(order), dtype=torch.int32, device=ids.device)
    dispatch = torch.where(here, torch.empty_like(rows).scatter_(0, order, rows), -1).int()
    counts = torch.zeros(local + 1, dtype=torch.int32, device=ids.device).scatter_add_(0, key, torch.ones_like(rows))
    return counts[:local], combine, dispatch


def _kernel_weight(experts: Mxfp4Experts, name: str):
    """A projection's blocks and scales in the layouts triton_kernels' matmul reads on this GPU (Hopper's on
    H100/H200: HopperMXValueLayout, HopperMXScaleLayout), as (E, in, out), and its precision config. The module's
    packed tensors are dropped once converted."""
    from triton_kernels.matmul_ogs import FlexCtx, PrecisionConfig
    from triton_kernels.numerics import InFlexData
    from triton_kernels.tensor import FP4, wrap_torch_tensor
    from triton_kernels.tensor_details import layout

    blocks, scales = getattr(experts, f"{name}_blocks"), getattr(experts, f"{name}_scales")
    delattr(experts, f"{name}_blocks")
    delattr(experts, f"{name}_scales")
    e, out, groups, _ = blocks.shape
    # mx_axis=1: the scales run along the inputs (dim 1 of the (E, in, out) weight). The scales' Hopper layout
    # fixes the matmul's warps and its tile width (4 warps: 128 columns, 8: 256). Narrower tiles give a decode
    # step's few experts twice the blocks: one MoE layer on an H200 took 3-18% less time at 1 to 512 tokens, for
    # both model shapes, with bitwise the same output.
    value_layout, value_options = layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
    scale_layout, scale_options = layout.make_default_matmul_mxfp4_w_scale_layout(mx_axis=1, num_warps=4)
    values = _convert_layout(
        wrap_torch_tensor(blocks.view(e, out, groups * 16).transpose(-2, -1), dtype=FP4), value_layout, **value_options
    )
    scales = _convert_layout(wrap_torch_tensor(scales.transpose(-2, -1)), scale_layout, **scale_options)
    # Hand the packed tensors' memory back before the next projection's converted one (a little larger) is
    # allocated: otherwise it splits their freed block and strands the rest, some 0.5 GiB a 120b layer, and a
    # gpt-oss-120b-shaped model ran out of memory converting on one H100 (it fit with expandable_segments).
    del blocks
    torch.cuda.empty_cache()
    return values, PrecisionConfig(weight_scale=scales, flex_ctx=FlexCtx(rhs_data=InFlexData()))


def _convert_layout(tensor, layout_class, **options):
    """triton_kernels' convert_layout for a freshly wrapped (strided) tensor, EXPERTS_A_STEP experts at a time
    into one tensor: the layouts rearrange each expert's matrix on its own, so the result is the same."""
    from triton_kernels.tensor import Storage, Tensor

    data = tensor.storage.data
    new_layout = layout_class(data.shape, **options)
    swizzled = None
    for first in range(0, data.shape[0], EXPERTS_A_STEP):
        part = new_layout.swizzle_data(data[first : first + EXPERTS_A_STEP])
        if swizzled is None:  # dense, but maybe transposed: keep the layout's memory order, and a zero tail
            shape = (data.shape[0], *part.shape[1:])
            memory = torch.zeros(
                math.prod(shape) + TAIL_BYTES // part.element_size(), dtype=part.dtype, device=part.device
            )
            swizzled = memory.as_strided(shape, part.stride())
        swizzled[first : first + EXPERTS_A_STEP] = part
    return Tensor(Storage(swizzled, new_layout), dtype=tensor.dtype, shape=tensor.shape, shape_max=tensor.shape_max)
