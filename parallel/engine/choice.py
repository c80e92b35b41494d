"""Which backend generates: the engine where it runs and is wanted, else the plain `model.generate` path."""

from __future__ import annotations

from parallel.config import EngineConfig
from parallel.distributed.layout import Layout
from parallel.engine.engine import Engine
from parallel.engine.plain import Plain
from parallel.log import log, warn


def choose_generator(model, cfg: EngineConfig, layout: Layout, pad_id: int, group=None) -> Engine | Plain:
    """The engine where it runs and is wanted (plan_model already refused engine.mode=always where it cannot run),
    else the plain path; the log says which generates."""
    if cfg.mode == "never" or layout.pp > 1 or (cfg.mode == "auto" and model.device.type != "cuda"):
        why = {"never": "engine.mode=never"}.get(cfg.mode) or (
            "the engine does not run pipeline stages" if layout.pp > 1 else "engine.mode=auto uses it on GPU only")
        log(f"generation: plain model.generate ({why})")
        return Plain(model, pad_id)
    try:
        engine = Engine(model, cfg.slots, cfg.cuda_graphs, cfg.compile, group, cfg.attention, cfg.cache_gib)
    except NotImplementedError as e:
        warn(f"generation: plain model.generate ({e})")
        return Plain(model, pad_id)
    log(f"generation: the engine ({engine.describe()})")
    return engine


