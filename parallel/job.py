"""The set-up and tear-down the entry scripts share, in the order they run: plan the run (config, model, layout:
everything that can be wrong with it, before a process group or a weight exists), join the job, load the model
and choose its backend, link rank 0 with the replicas' leaders, leave the job."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from openai_harmony import HarmonyEncoding
from transformers import GptOssConfig

from parallel.config import ConfigError, JobConfig, load_config
from parallel.distributed.layout import Layout, LayoutError
from parallel.distributed.mesh import Placement
from parallel.distributed.runtime import Watchdog
from parallel.engine.choice import choose_backend
from parallel.engine.interface import Backend
from parallel.loading.model import load_model, plan_model
from parallel.log import error
from parallel.protocol.harmony import encoding, pad_token_id, stop_tokens
from parallel.replicas.channel import Hub, Link, connect


@dataclass
class Run:
    cfg: JobConfig
    path: str  # the checkpoint, resolved
    shape: GptOssConfig
    layout: Layout
    enc: HarmonyEncoding


def plan_run(
    argv: list[str] | None, required: tuple[str, ...] = (), check: Callable[[JobConfig], None] | None = None
) -> Run | None:
    """The run, or None after saying what is wrong with it. Every rank plans alike (`check`: the paths the job
    reads and writes), so a bad run ends on every rank at once rather than with ranks waiting for each other."""
    try:
        cfg = load_config(argv, required)
        if check:
            check(cfg)
        path, shape, layout = plan_model(cfg)
        enc = encoding()  # offline without its vocabulary, harmony fails here, naming TIKTOKEN_ENCODINGS_BASE
    except (ConfigError, LayoutError, OSError, ValueError) as e:
        error(str(e))
        return None
    return Run(cfg, path, shape, layout, enc)


def load_backend(run: Run, place: Placement) -> Backend | None:
    """The model on this rank's shard, behind the backend that will generate with it; None after saying why the
    model cannot load as asked (e.g. model.mxfp4=require where only dequantizing is possible)."""
    try:
        model = load_model(run.path, run.shape, run.cfg.model, run.layout, place)
    except RuntimeError as e:
        error(str(e))
        return None
    return choose_backend(
        model,
        run.cfg.engine,
        run.layout.pp,
        run.cfg.generation.batch_size,
        stop_tokens(run.enc),
        pad_token_id(run.enc),
        place.replica_group,
    )


def open_links(place: Placement, store: dist.Store, replicas: int) -> tuple[Hub | None, Link | None]:
    """Rank 0: the hub of every replica leader's link (waiting for them all to connect), and its own replica's
    link; another replica's leader: its link; other ranks: nothing."""
    if place.rank == 0:
        hub = Hub()
        hub.accept(store, replicas)
        return hub, hub.local
    return None, connect(store, place.replica) if place.is_leader else None


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def finish_job(watchdog: Watchdog, backend: Backend | None = None) -> None:
    """Leave the job, every rank together. The backend lets go of its CUDA graphs first: a process whose graphs
    captured NCCL collectives (the engine under tp or ep) hangs at exit once its process group is destroyed
    (pytorch/pytorch#115388): on 2 H100s a tp job without this wrote every record, then both ranks waited in
    ncclCommFinalize for good, and exited at once with it."""
    if backend is not None:
        backend.close()
    watchdog.stop()
    dist.barrier()
    dist.destroy_process_group()


def stop_job(watchdog: Watchdog, code: int) -> NoReturn:
    """Leave the job before any model loads, every rank with exit `code`. torchrun stops the ranks still running
    once one exits non-zero; a rank it stops while leaving exits with `code` too, rather than by its SIGTERM (two
    ranks refused an output: whichever exited first, torchrun's SIGTERM ended the other with -15). No rank lingers
    in interpreter teardown, where a signal handler may never run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(code))
    finish_job(watchdog)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
