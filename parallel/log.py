"""One rank-aware logging helper: rank 0 speaks for the job; `everywhere=True` is for what each rank must say."""

from __future__ import annotations

import os
import sys
import time

_START = time.monotonic()


def log_clock() -> float:
    """When this process's clock started: a process it starts keeps the same clock (set_log_clock)."""
    return _START


def set_log_clock(start: float) -> None:
    global _START
    _START = start


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def log(msg: str, everywhere: bool = False) -> None:
    if everywhere or rank() == 0:
        print(f"[gpt-oss {time.monotonic() - _START:7.1f}s rank {rank()}] {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    log(f"WARNING: {msg}")


def error(msg: str) -> None:
    log(f"ERROR: {msg}", everywhere=True)
