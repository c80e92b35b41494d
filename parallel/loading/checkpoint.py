"""Where a model comes from: a hub id, a local folder, the embedded tiny gpt-oss, or a published shape without
weights (for random-weight benchmarks); and its config, read before any weight."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, GptOssConfig, GptOssForCausalLM

from parallel.config import ModelConfig
from parallel.log import log

TINY = "builtin:tiny"
TINY_NAME = "tiny-v1"  # bump when the tiny model's shape or seed changes
# The published models' shapes (their config.json), for model.load_format=dummy without a download.
SHAPES = {
    "builtin:gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "builtin:gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
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
    path = model_cfg.path
    if path.startswith("builtin:") and path != TINY and path not in SHAPES:
        raise ValueError(f"model.path={path} is no built-in model: choose one of {', '.join([TINY, *SHAPES])}")
    # A path written as one would otherwise reach the hub as a malformed repo id, and its error says only that.
    if path.startswith(("/", ".")) and not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.path={path}: no such folder (model.path is a checkpoint folder, a hub id or {TINY})"
        )
    if path in SHAPES and model_cfg.load_format != "dummy":
        raise ValueError(f"model.path={path} is a shape without weights: add model.load_format=dummy")


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


def check_weights(path: str) -> None:
    """A local folder's weight files are there and their headers read, each covering its file: a copy cut short or
    a missing shard is named now, before any process group exists, rather than by a traceback mid-load. Hub ids are
    left to transformers, which downloads and checks them."""
    folder = Path(path)
    if not folder.is_dir() or (folder / "pytorch_model.bin").exists():
        return
    index = folder / "model.safetensors.index.json"
    try:
        names = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"model.path={path}: cannot read {index.name}: {type(e).__name__}: {e}") from None
    for name in names:
        try:
            with safe_open(folder / name, framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise ValueError(f"model.path={path}: cannot read the weights in {name}: {e}") from None


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
