"""Loading a checkpoint with transformers' own distributed support, each replica on its own sub-mesh."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict

import torch
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.distributed import DistributedConfig
from transformers.utils import logging as transformers_logging

from parallel.config import JobConfig, ModelConfig
from parallel.distributed.checkpoint import (
    check_source,
    read_model_config,
    resolve_checkpoint,
)
from parallel.distributed.layout import Layout, LayoutError, plan_layout
from parallel.distributed.mesh import Placement
from parallel.distributed.mxfp4 import gpu_bytes, is_mxfp4, report_mxfp4, settle_mxfp4
from parallel.log import log, warn

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


def load_model(path: str, config: GptOssConfig, model_cfg: ModelConfig, layout: Layout, place: Placement) -> GptOssForCausalLM:
    """`config`: what read_model_config(path) gave when the layout was validated."""
    kwargs = {
        "dtype": "auto" if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype),
        "attn_implementation": attention_implementation(model_cfg.attn_implementation, place.device),
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
        model = GptOssForCausalLM.from_pretrained(path, device_map=place.device, **kwargs)
    else:
        distributed = DistributedConfig(
            tp_size=layout.mp,
            tp_plan=ATTENTION_TP_PLAN if layout.tp > 1 else None,
            ep_size=layout.ep,
            pp_size=layout.pp,
        )
        model = _on_replica_mesh(place).from_pretrained(path, distributed_config=distributed, **kwargs)
    if mxfp4:
        report_mxfp4(model, model_cfg.mxfp4)
    return model.eval()


def _on_replica_mesh(place: Placement) -> type[GptOssForCausalLM]:
    """transformers lays its device mesh over the whole world (`initialize_distributed_mesh`); a data-parallel
    replica must shard over its own ranks only, so this subclass hands transformers the replica's sub-mesh."""

    def prepare_distribute_model(cls, distributed_config, device_map=None):
        return distributed_config, place.device, place.model_mesh

    base = GptOssForCausalLM
    # Keep the base's module: transformers reads the model's source file to decide which kernels it may swap in.
    return type(base.__name__, (base,), {"__module__": base.__module__, "prepare_distribute_model": classmethod(prepare_distribute_model)})
