"""MXFP4 checkpoints (the published gpt-oss experts): which path runs them, decided before loading, and a loud
report of what transformers actually did."""

from __future__ import annotations

import torch
from transformers import GptOssConfig, GptOssForCausalLM

from parallel.config import EngineConfig
from parallel.distributed.layout import Layout
from parallel.log import log, warn

# The share of a GPU that bf16 weights may take when MXFP4 experts are dequantized for the engine: the rest is
# the engine's KV cache and working memory.
DEQUANTIZED_SHARE = 0.85


def is_mxfp4(config: GptOssConfig) -> bool:
    quant = getattr(config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method).lower().endswith("mxfp4")


def report_mxfp4(model: GptOssForCausalLM, mode: str) -> None:
    """transformers falls back to dequantizing with no more than a log line: say which path runs, and fail
    where the config demands the native one."""
    experts = model.model.layers[0].mlp.experts
    if "Mxfp4" in type(experts).__name__:
        log("MXFP4 experts run natively (transformers' MXFP4 kernels)")
        return
    # DTensor shards count their local part: what this rank holds.
    params = sum(
        getattr(p, "_local_tensor", p).numel() for n, p in model.named_parameters() if ".experts." in n and not n.endswith("_bias")
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


def settle_mxfp4(engine: EngineConfig, shape: GptOssConfig, layout: Layout, gpu_bytes: int | None) -> str:
    """model.mxfp4=auto for an MXFP4 checkpoint: `dequantize` where the engine will generate and the experts
    in bf16 fit a rank with room to spare (the engine runs float experts only, and through it the model is far
    faster than natively MXFP4 through model.generate); else `auto`, which runs MXFP4 natively where
    transformers' kernels can be had. `gpu_bytes`: one GPU's memory, None without a GPU."""
    engine_runs = layout.pp == 1 and (engine.mode == "always" or (engine.mode == "auto" and gpu_bytes is not None))
    if not engine_runs:
        return "auto"
    need = bf16_bytes_a_rank(shape, layout)
    if gpu_bytes is not None and need > DEQUANTIZED_SHARE * gpu_bytes:
        warn(f"MXFP4 experts stay MXFP4 where transformers' kernels can be had: in bf16 the model needs "
             f"{need / 2**30:.0f} GiB a rank ({layout}), over {DEQUANTIZED_SHARE:.0%} of a GPU's "
             f"{gpu_bytes / 2**30:.0f} GiB, so the plain path generates (the engine runs bf16 experts; more "
             f"parallel.ep ranks would fit them)")
        return "auto"
    log(f"MXFP4 experts dequantized to bf16 for the engine ({need / 2**30:.0f} GiB a rank)")
    return "dequantize"


def bf16_bytes_a_rank(shape: GptOssConfig, layout: Layout) -> int:
    """The model's bytes in bf16 on one rank: experts split over ep ranks, attention and embeddings over tp."""
    hidden, inner, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    experts = layers * shape.num_local_experts * (3 * hidden * inner + 2 * inner + hidden)
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    attention = layers * (2 * hidden * q + 2 * hidden * kv + q + 2 * kv + hidden + shape.num_attention_heads)
    rest = 2 * shape.vocab_size * hidden + layers * (hidden * shape.num_local_experts + shape.num_local_experts + 2 * hidden)
    return 2 * (experts // layout.ep + (attention + rest) // layout.tp)


def gpu_bytes() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


