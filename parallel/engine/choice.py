"""Which backend generates: the engine where it runs and is wanted, else the plain `model.generate` path. The one
place that decides; the log says which runs and why."""

from __future__ import annotations

from parallel.config import EngineConfig
from parallel.engine.engine import Engine
from parallel.engine.interface import Backend
from parallel.engine.plain import Plain
from parallel.log import log, warn


def choose_backend(
    model, cfg: EngineConfig, pp: int, batch_size: int, stop: dict[int, str], pad_id: int, group=None
) -> Backend:
    """plan_model already refused engine.mode=always where the engine cannot run (pipeline stages)."""
    plain = Plain(model, batch_size, stop, pad_id)
    if cfg.mode == "never" or pp > 1 or (cfg.mode == "auto" and model.device.type != "cuda"):
        why = {"never": "engine.mode=never"}.get(cfg.mode) or (
            "the engine does not run pipeline stages" if pp > 1 else "engine.mode=auto uses it on GPU only"
        )
        log(f"generation: {plain.describe()} ({why})")
        return plain
    try:
        engine = Engine(model, cfg, stop, group)
    except NotImplementedError as e:
        warn(f"generation: {plain.describe()} ({e})")
        return plain
    log(f"generation: the engine ({engine.describe()})")
    return engine
