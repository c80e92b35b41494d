"""MXFP4 experts (the published gpt-oss checkpoints store them so): which path runs them, decided before
loading, and a loud report of what runs.

`model.mxfp4` settles to one of:
  require     the experts stay packed, as the checkpoint stores them, and the engine runs them: through
              triton_kernels' matmul_ogs on GPU (parallel/engine/mxfp4.py), else a reference that dequantizes a
              layer at a time (CPU tests);
  dequantize  transformers widens them to bf16 at load (the engine's grouped_mm, or the plain path);
  auto        left to transformers, for the plain path: native where its hub kernels can be had, else dequantized.
`auto` asked for settles to `require` where the engine generates and triton_kernels runs, else to `dequantize`
with a warning naming what is missing (refused where bf16 would not fit), else (plain path) stays `auto`.
"""

from __future__ import annotations

import torch
from transformers import GptOssConfig, GptOssForCausalLM

from parallel.config import EngineConfig, ModelConfig
from parallel.distributed.layout import Layout, LayoutError
from parallel.engine.mxfp4 import Mxfp4Experts, triton_kernels_problem
from parallel.loading.checkpoint import SHAPES
from parallel.log import log, warn

INSTALL = (
    "pip install --no-deps triton_kernels-1.0.0-py3-none-any.whl (staged offline), or pip install "
    "'triton_kernels @ git+https://github.com/triton-lang/triton.git@v3.6.0#subdirectory=python/triton_kernels' "
    "(pip install -e .[mxfp4]), beside triton 3.6"
)

# The share of a GPU that bf16 weights may take when MXFP4 experts are dequantized for the engine: the rest is
# the engine's KV cache and working memory.
DEQUANTIZED_SHARE = 0.85


def is_mxfp4(config: GptOssConfig) -> bool:
    quant = getattr(config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method).lower().endswith("mxfp4")


def has_mxfp4_experts(shape: GptOssConfig, model_cfg: ModelConfig) -> bool:
    """An MXFP4 checkpoint, or random weights of a published shape (which ships its experts in MXFP4)."""
    return is_mxfp4(shape) or (model_cfg.load_format == "dummy" and model_cfg.path in SHAPES)


def report_mxfp4(model: GptOssForCausalLM, mode: str) -> None:
    """transformers falls back to dequantizing with no more than a log line: say which path runs, and fail
    where the config demands the native one."""
    experts = model.model.layers[0].mlp.experts
    if isinstance(experts, Mxfp4Experts):
        log(
            f"MXFP4 experts kept packed, run by the engine through {experts.path}: experts [{experts.first_expert}, "
            f"{experts.first_expert + experts.local}) of {model.config.num_local_experts} on this rank",
            everywhere=True,
        )
        return
    if "Mxfp4" in type(experts).__name__:
        log("MXFP4 experts run natively (transformers' MXFP4 kernels)")
        return
    # DTensor shards count their local part: what this rank holds.
    params = sum(
        getattr(p, "_local_tensor", p).numel()
        for n, p in model.named_parameters()
        if ".experts." in n and not n.endswith("_bias")
    )
    size = next(experts.parameters()).element_size()
    message = (
        f"MXFP4 experts were dequantized to {next(experts.parameters()).dtype} (no MXFP4 kernels here: they need "
        f"a GPU, triton and the kernels package with the hub or a staged copy): {params * size / 2**30:.2f} GiB of "
        f"experts on this rank instead of {params * 4.25 / 8 / 2**30:.2f} GiB"
    )
    if mode == "require":
        raise RuntimeError(f"model.mxfp4=require, but {message}")
    warn(message)


def settle_mxfp4(
    model_cfg: ModelConfig, engine: EngineConfig, shape: GptOssConfig, layout: Layout, gpu_bytes: int | None
) -> str:
    """model.mxfp4 as it will run (the module's docstring). `gpu_bytes`: one GPU's memory, None without a GPU."""
    mode = model_cfg.mxfp4
    if not has_mxfp4_experts(shape, model_cfg) or mode == "dequantize":
        return mode
    engine_runs = layout.pp == 1 and (engine.mode == "always" or (engine.mode == "auto" and gpu_bytes is not None))
    if mode == "require":
        if not engine_runs:
            raise LayoutError(
                "model.mxfp4=require keeps the experts in MXFP4, which only the engine runs: set "
                "engine.mode=always (on CPU: a slow reference path) and no parallel.pp, or model.mxfp4=dequantize"
            )
        return "require"
    if not engine_runs:
        return "auto"
    problem = triton_kernels_problem() if gpu_bytes is not None else "no GPU"
    if problem is None:
        return "require"
    need = bf16_bytes_a_rank(shape, layout)
    if gpu_bytes is not None and need > DEQUANTIZED_SHARE * gpu_bytes:
        raise LayoutError(
            f"MXFP4 experts cannot run natively here ({problem}), and dequantized to bf16 the model needs "
            f"{need / 2**30:.0f} GiB a rank ({layout}), over {DEQUANTIZED_SHARE:.0%} of a GPU's "
            f"{gpu_bytes / 2**30:.0f} GiB: {INSTALL}; or split the experts over more parallel.ep ranks"
        )
    warn(
        f"MXFP4 experts dequantized to bf16 for the engine ({need / 2**30:.0f} GiB a rank), since they cannot run "
        f"natively here: {problem}. To keep them MXFP4: {INSTALL}"
    )
    return "dequantize"


def bf16_bytes_a_rank(shape: GptOssConfig, layout: Layout) -> int:
    """The model's bytes in bf16 on one rank: experts split over ep ranks, attention and embeddings over tp."""
    hidden, inner, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    experts = layers * shape.num_local_experts * (3 * hidden * inner + 2 * inner + hidden)
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    attention = layers * (2 * hidden * q + 2 * hidden * kv + q + 2 * kv + hidden + shape.num_attention_heads)
    rest = 2 * shape.vocab_size * hidden + layers * (
        hidden * shape.num_local_experts + shape.num_local_experts + 2 * hidden
    )
    return 2 * (experts // layout.ep + (attention + rest) // layout.tp)


def gpu_bytes() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
