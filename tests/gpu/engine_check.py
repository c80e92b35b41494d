"""GPU check of the engine (CI has no GPU; run by hand and record the output in docs/performance.md):

    python tests/gpu/engine_check.py

1. greedy tokens, float32 (grouped_mm off, eager steps): the engine over a paged cache with a small token budget
   (chunked prefill) and a cache small enough to preempt, against the plain path (`model.generate`), tiny model;
2. the taught tiny model (tests/taught.py) in bfloat16 through the engine's whole GPU path (grouped_mm, Triton
   attention, CUDA graphs for decode steps, torch.compile'd pieces, prefix caching): its three lessons answered
   token for token, twice (the second time from the prefix cache). (The random tiny model's logits are too close in
   bf16 for exact comparisons between two implementations; the taught one's are not.)
Exits non-zero if any tokens differ.
"""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import GptOssForCausalLM

from parallel.config import EngineConfig
from parallel.distributed.checkpoint import TINY, resolve_checkpoint
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.plain import Plain
from parallel.protocol.harmony import encoding, pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.taught import LESSONS, teach


def greedy_matches(enc) -> tuple[int, int, str]:
    model = GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY), dtype=torch.float32, attn_implementation="eager").cuda().eval()
    texts = ["Say hello.", "What is 2+2?", "Hi", "Tell me a story about a cat that learned to fly over the sea."] * 3
    limits = [24, 5, 30, 12, 7, 24, 3, 18, 24, 9, 30, 2]
    work = [Work(i, render_prompt(enc, parse_request({"prompt": t}, 0), "medium"), n, Sampling()) for i, (t, n) in enumerate(zip(texts, limits))]
    plain = complete(Plain(model, 1, stop_tokens(enc), pad_token_id(enc)), work)
    engine = Engine(model, EngineConfig(slots=5, max_batched_tokens=48, block_size=16, cache_gib=40 * 16 * 1024 / 2**30), stop_tokens(enc))
    fast = complete(engine, work)
    same = sum(fast[w.rid][0] == plain[w.rid][0] for w in work)
    return same, len(work), f"{engine.describe()}; {engine.scheduler.preemptions} preemptions"


def taught_lessons(enc) -> tuple[int, int, str]:
    path = teach(Path(tempfile.mkdtemp()))
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    prompts = [render_prompt(enc, parse_request(obj, 0), "medium") for obj, _ in LESSONS]
    answers = [enc.encode(text, allowed_special="all") for _, text in LESSONS]
    engine = Engine(model, EngineConfig(slots=4), stop_tokens(enc))
    same = 0
    for attempt in range(2):
        out = complete(engine, [Work(10 * attempt + i, p, 64, Sampling()) for i, p in enumerate(prompts)])
        same += sum(out[10 * attempt + i][0] == a for i, a in enumerate(answers))
    return same, 2 * len(answers), f"{engine.describe()}; prefix cache hit {engine.pool.hits} of {engine.pool.queries} prompt tokens"


def main() -> int:
    print("torch", torch.__version__, torch.cuda.get_device_name())
    enc = encoding()
    same, total, how = greedy_matches(enc)
    print(f"greedy float32: engine ({how}) = plain path on {same}/{total} prompts")
    ok = same == total
    same, total, how = taught_lessons(enc)
    print(f"greedy bfloat16, taught model: engine ({how}) answers {same}/{total} lessons token for token")
    ok &= same == total
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
