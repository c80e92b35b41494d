"""Seeded benchmark workloads, as the launcher's input lines: what `launch/bench.py` and `launch/scaling.py` run.

- `sharegpt`: chat-like requests, prompt and output lengths log-normal (means about 220 and 200 tokens, clipped to
  [4, 4096] and [1, 1024]); each request's max_new_tokens is its drawn output length;
- `long`: 8,000-token prompts and 128 new tokens (prefill);
- `fixed`: every prompt `prompt_tokens` long, every output `new_tokens` (1k/1k, say).
Prompt text is random common words, each one token of o200k, so a drawn length is the user message's token count
(harmony's header adds its own ~60). Random weights rarely emit a stop token, so outputs run to their budgets.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from openai_harmony import HarmonyEncoding

SIGMA = 1.0  # log-normal spread of both lengths (ShareGPT's are heavy-tailed)


def words(enc: HarmonyEncoding, count: int = 2000) -> list[str]:
    """Common lowercase words that o200k encodes as one token each (with their leading space). Encoded with no
    check for special tokens (plain words hold none): the check costs harmony some 10 ms a call."""
    found = []
    for token in range(1000, 60000):
        text = enc.decode([token])
        if re.fullmatch(r" [a-z]{3,9}", text) and enc.encode(text, disallowed_special=()) == [token]:
            found.append(text)
            if len(found) == count:
                break
    return found


def lognormal(rng: random.Random, mean: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(mean) - SIGMA**2 / 2, SIGMA))))


def lengths(kind: str, n: int, seed: int, prompt_tokens: int = 1024, new_tokens: int = 1024) -> list[tuple[int, int]]:
    """(prompt tokens, new tokens) of each request."""
    rng = random.Random(seed)
    if kind == "sharegpt":
        return [(lognormal(rng, 220, 4, 4096), lognormal(rng, 200, 1, 1024)) for _ in range(n)]
    if kind == "long":
        return [(8000, 128)] * n
    if kind == "fixed":
        return [(prompt_tokens, new_tokens)] * n
    raise ValueError(f"unknown workload {kind!r} (sharegpt, long, fixed)")


def write_workload(
    path: Path, enc: HarmonyEncoding, kind: str, n: int, seed: int = 0, **sizes
) -> list[tuple[int, int]]:
    """The workload as JSONL input lines ({"id", "prompt", "max_new_tokens"}); returns its lengths."""
    rng = random.Random(seed + 1)
    vocabulary = words(enc)
    drawn = lengths(kind, n, seed, **sizes)
    with open(path, "w") as f:
        for i, (prompt, new) in enumerate(drawn):
            text = "".join(rng.choice(vocabulary) for _ in range(prompt)).strip()
            f.write(json.dumps({"id": i, "prompt": text, "max_new_tokens": new}) + "\n")
    return drawn


def head(workload: Path, n: int, path: Path) -> Path:
    """The workload's first n requests as a file of their own: a point's (or the plain recipe's) share of it."""
    with open(workload) as f:
        path.write_text("".join(line for _, line in zip(range(n), f)))
    return path
