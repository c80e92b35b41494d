"""Finding the checkpoint, reading its shape, and loading it with transformers' own distributed support."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig, GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.distributed import DistributedConfig
from transformers.utils import logging as transformers_logging

from parallel.config import EngineConfig, JobConfig, ModelConfig
from parallel.layout import Layout, LayoutError, plan_layout
from parallel.log import log, warn
from parallel.mesh import Mesh

TINY = "builtin:tiny"
TINY_NAME = "tiny-v1"  # bump when the tiny model's shape or seed changes
# The published models' shapes (their config.json), for model.load_format=dummy without a download.
SHAPES = {
    "builtin:gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "builtin:gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
}

# The share of a GPU that bf16 weights may take when MXFP4 experts are dequantized for the engine: the rest is
# the engine's KV cache and working memory.
DEQUANTIZED_SHARE = 0.85

# transformers 5.23 ships no tensor-parallel rules for gpt-oss's attention (only embeddings and lm_head), so
# tp > 1 shards the heads here, the way its other attention-sink models do. Experts follow parallel.ep.
ATTENTION_TP_PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.self_attn.sinks": "colwise",
    "model.layers.*.self_attn": "local_params",
}


def tiny_config() -> GptOssConfig:
    """gpt-oss in miniature: MoE router and experts, sinks, sliding/full layers, the real 201,088-token vocabulary."""
    return GptOssConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        max_position_embeddings=4096,
        # Wide initial weights make the logits far apart, so greedy tokens do not flip with the reduction order
        # of a different parallel layout.
        initializer_range=0.5,
        vocab_size=201088,
        pad_token_id=199999,
        bos_token_id=199998,
        eos_token_id=[200002, 200012],
    )


def cache_dir() -> Path:
    return Path(os.environ.get("GPT_OSS_LAUNCH_CACHE", Path.home() / ".cache" / "gpt-oss-launch"))


def check_source(model_cfg: ModelConfig) -> None:
    if model_cfg.path in SHAPES and model_cfg.load_format != "dummy":
        raise ValueError(f"model.path={model_cfg.path} is a shape without weights: add model.load_format=dummy")


def resolve_checkpoint(path: str) -> str:
    """A local folder or hub id as given; `builtin:tiny` is built once (seeded, under a file lock) and cached."""
    if path != TINY:
        return path
    target = cache_dir() / TINY_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{TINY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            log(f"building the tiny gpt-oss checkpoint in {target}")
            torch.manual_seed(0)
            model = GptOssForCausalLM(tiny_config())
            # Written beside the target and renamed, so a killed build never leaves half a checkpoint.
            tmp = Path(tempfile.mkdtemp(dir=target.parent))
            model.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return str(target)


def plan_model(cfg: JobConfig) -> tuple[str, GptOssConfig, Layout]:
    """Everything about the model that can be wrong with a job, found before a process group or a weight
    exists: the source, its config, and a layout that fits the world size and the model's shape. Settles
    model.mxfp4=auto for an MXFP4 checkpoint that the engine will run (settle_mxfp4)."""
    check_source(cfg.model)
    path = resolve_checkpoint(cfg.model.path)
    shape = read_model_config(path)
    layout = plan_layout(
        int(os.environ.get("WORLD_SIZE", 1)),
        **asdict(cfg.parallel),
        heads=shape.num_attention_heads,
        kv_heads=shape.num_key_value_heads,
        experts=shape.num_local_experts,
        layers=shape.num_hidden_layers,
    )
    if cfg.engine.mode == "always" and layout.pp > 1:
        raise LayoutError(f"engine.mode=always: the engine does not run pipeline stages ({layout}); use engine.mode=auto")
    if is_mxfp4(shape) and cfg.model.mxfp4 == "auto":
        cfg.model.mxfp4 = settle_mxfp4(cfg.engine, shape, layout, gpu_bytes())
    return path, shape, layout


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


def read_model_config(path: str) -> GptOssConfig:
    """Only config.json: enough to validate a layout before any weight is read."""
    if path in SHAPES:
        return GptOssConfig(
            **SHAPES[path],
            hidden_size=2880,
            intermediate_size=2880,
            head_dim=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            num_experts_per_tok=4,
            sliding_window=128,
            vocab_size=201088,
            pad_token_id=199999,
            eos_token_id=[200002, 199999, 200012],
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read a model config at {path!r}: {e}") from None
    if config.model_type != "gpt_oss":
        raise ValueError(f"{path!r} is a {config.model_type!r} model; this launcher runs gpt-oss")
    return config


def attention_implementation(requested: str, device: torch.device) -> str:
    """`auto`: flash-attn-4 (sinks, sliding window, GQA) where it can be had, else eager, with a warning on GPU."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") and importlib.util.find_spec("flash_attn.cute"):
            return "flash_attention_4"
        warn(
            "no attention kernel with sinks is installed (pip install flash-attn-4, or set "
            "model.attn_implementation=kernels-community/vllm-flash-attn3 where the hub is reachable): using eager"
        )
    return "eager"


def load_model(path: str, config: GptOssConfig, model_cfg: ModelConfig, layout: Layout, mesh: Mesh) -> GptOssForCausalLM:
    """`config`: what read_model_config(path) gave when the layout was validated."""
    kwargs = {
        "dtype": "auto" if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype),
        "attn_implementation": attention_implementation(model_cfg.attn_implementation, mesh.device),
    }
    if model_cfg.load_format == "dummy":
        # No checkpoint: every weight counts as missing, so transformers initialises it at random where it lives,
        # each rank only its own shard (as vLLM's --load-format dummy). Real speed, meaningless text.
        kwargs.update(config=config, state_dict={})
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = torch.bfloat16
        path = None
        # Its loading report would list every weight as missing.
        transformers_logging.set_verbosity_error()
        # The same draws on every rank: weights that a layout replicates come out equal everywhere.
        torch.manual_seed(0)
    mxfp4 = is_mxfp4(config)
    if mxfp4 and model_cfg.mxfp4 == "dequantize":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    log(f"loading {path or 'random weights'} ({layout}, attention: {kwargs['attn_implementation']})")
    if layout.replica_size == 1:
        model = GptOssForCausalLM.from_pretrained(path, device_map=mesh.device, **kwargs)
    else:
        distributed = DistributedConfig(
            tp_size=layout.mp,
            tp_plan=ATTENTION_TP_PLAN if layout.tp > 1 else None,
            ep_size=layout.ep,
            pp_size=layout.pp,
        )
        model = _on_replica_mesh(mesh).from_pretrained(path, distributed_config=distributed, **kwargs)
    if mxfp4:
        report_mxfp4(model, model_cfg.mxfp4)
    return model.eval()


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


def _on_replica_mesh(mesh: Mesh) -> type[GptOssForCausalLM]:
    """transformers lays its device mesh over the whole world (`initialize_distributed_mesh`); a data-parallel
    replica must shard over its own ranks only, so this subclass hands transformers the replica's sub-mesh."""

    def prepare_distribute_model(cls, distributed_config, device_map=None):
        return distributed_config, mesh.device, mesh.model_mesh

    base = GptOssForCausalLM
    # Keep the base's module: transformers reads the model's source file to decide which kernels it may swap in.
    return type(base.__name__, (base,), {"__module__": base.__module__, "prepare_distribute_model": classmethod(prepare_distribute_model)})
