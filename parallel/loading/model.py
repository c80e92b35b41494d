"""Loading a checkpoint with transformers' own distributed support, each replica on its own sub-mesh."""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import asdict

import torch
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.distributed import DistributedConfig
from transformers.utils import logging as transformers_logging

from parallel.config import JobConfig, ModelConfig
from parallel.distributed.layout import Layout, LayoutError, plan_layout
from parallel.distributed.mesh import Placement
from parallel.engine.mxfp4 import BIASES, PACKED, Mxfp4Experts
from parallel.loading.checkpoint import (
    check_source,
    check_weights,
    read_model_config,
    resolve_checkpoint,
)
from parallel.loading.quantization import gpu_bytes, is_mxfp4, report_mxfp4, settle_mxfp4
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
# Experts kept in MXFP4 are split by expert over all of a replica's ranks, under tp as under ep, through the
# tensor plan (Shard(0), each rank reading only its share): transformers' expert plan would also hook the
# experts' forward, which only the engine calls, with its own routing.
PACKED_EXPERTS_TP_PLAN = {f"model.layers.*.mlp.experts.{name}": "grouped_gemm" for name in (*PACKED, *BIASES)}


def plan_model(cfg: JobConfig) -> tuple[str, GptOssConfig, Layout]:
    """Everything about the model that can be wrong with a job, found before a process group or a weight
    exists: the source, its config, and a layout that fits the world size and the model's shape. Settles
    model.mxfp4=auto for an MXFP4 checkpoint that the engine will run (settle_mxfp4)."""
    check_source(cfg.model)
    path = resolve_checkpoint(cfg.model.path)
    shape = read_model_config(path)
    if cfg.model.load_format != "dummy":
        check_weights(path)
    layout = plan_layout(
        int(os.environ.get("WORLD_SIZE", 1)),
        **asdict(cfg.parallel),
        heads=shape.num_attention_heads,
        kv_heads=shape.num_key_value_heads,
        experts=shape.num_local_experts,
        layers=shape.num_hidden_layers,
    )
    if cfg.engine.mode == "always" and layout.pp > 1:
        raise LayoutError(
            f"engine.mode=always: the engine does not run pipeline stages ({layout}); use engine.mode=auto"
        )
    cfg.model.mxfp4 = settle_mxfp4(cfg.model, cfg.engine, shape, layout, gpu_bytes())
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


def load_model(
    path: str, config: GptOssConfig, model_cfg: ModelConfig, layout: Layout, place: Placement
) -> GptOssForCausalLM:
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
    mxfp4, packed = is_mxfp4(config), model_cfg.mxfp4 == "require"
    if packed:
        # Without a quantization config transformers neither dequantizes nor swaps in its own MXFP4 experts: the
        # checkpoint's blocks, scales and biases load as they are into Mxfp4Experts' parameters.
        kwargs["config"] = copy.deepcopy(config)
        kwargs["config"].quantization_config = None
    elif mxfp4 and model_cfg.mxfp4 == "dequantize":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    log(f"loading {path or 'random weights'} ({layout}, attention: {kwargs['attn_implementation']})")
    model_class = _model_class(place if layout.replica_size > 1 else None, packed)
    if layout.replica_size == 1:
        model = model_class.from_pretrained(path, device_map=place.device, **kwargs)
    else:
        tp_plan = (ATTENTION_TP_PLAN if layout.tp > 1 else {}) | (PACKED_EXPERTS_TP_PLAN if packed else {})
        distributed = DistributedConfig(
            tp_size=layout.mp, tp_plan=tp_plan or None, ep_size=1 if packed else layout.ep, pp_size=layout.pp
        )
        model = model_class.from_pretrained(path, distributed_config=distributed, **kwargs)
    if packed:
        _prepare_packed_experts(model, random=model_cfg.load_format == "dummy")
    if mxfp4 or packed:
        report_mxfp4(model, model_cfg.mxfp4)
    return model.eval()


def _prepare_packed_experts(model: GptOssForCausalLM, random: bool) -> None:
    """Each layer's experts: this rank's share, random where no checkpoint was read, then in the layouts of the
    path that runs them (parallel/engine/mxfp4.py), one layer at a time."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.localize_()
        if random:
            experts.fill_random_()
        experts.prepare(model.dtype)


def _model_class(place: Placement | None, packed: bool) -> type[GptOssForCausalLM]:
    """GptOssForCausalLM, or a subclass of it:
    - for a replica spanning ranks (`place`): transformers lays its device mesh over the whole world
      (`initialize_distributed_mesh`); a data-parallel replica must shard over its own ranks only, so the subclass
      hands transformers the replica's sub-mesh;
    - with `packed` experts: each layer's experts are Mxfp4Experts, whose parameters the checkpoint's MXFP4
      tensors load into as they are."""
    base = GptOssForCausalLM
    # Keep the base's module: transformers reads the model's source file to decide which kernels it may swap in.
    attrs = {"__module__": base.__module__}
    if place is not None:
        attrs["prepare_distribute_model"] = classmethod(
            lambda cls, distributed_config, device_map=None: (distributed_config, place.device, place.model_mesh)
        )
    if packed:
        attrs["__init__"] = _with_packed_experts
    return type(base.__name__, (base,), attrs) if len(attrs) > 1 else base


def _with_packed_experts(self: GptOssForCausalLM, config: GptOssConfig) -> None:
    GptOssForCausalLM.__init__(self, config)
    for layer in self.model.layers:
        layer.mlp.experts = Mxfp4Experts(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            top_k=config.num_experts_per_tok,
            limit=config.swiglu_limit,
            alpha=config.swiglu_alpha,
        )
