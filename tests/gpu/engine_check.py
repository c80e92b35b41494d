"""GPU check of the engine (CI has no GPU; run by hand and record the output in docs/benchmarks.md):

    python tests/gpu/engine_check.py

1. greedy tokens, float32 (grouped_mm off, eager steps): the engine over a paged cache with a small token budget
   (chunked prefill) and a cache small enough to preempt, against the plain path (`model.generate`), tiny model;
2. the taught tiny model (tests/taught.py) in bfloat16 through the engine's whole GPU path (grouped_mm, Triton
   attention, CUDA graphs for decode steps, torch.compile'd pieces, prefix caching): its three lessons answered
   token for token, twice (the second time from the prefix cache). (The random tiny model's logits are too close in
   bf16 for exact comparisons between two implementations; the taught one's are not.)
3. the sampler at gpt-oss's vocabulary: the Triton draw (parallel/engine/kernels/gumbel.py) against torch's on
   the same logits and noise, 1, 128 and 300 rows (the same tokens but where their float rounding differs: at
   most SAMPLER_MISMATCH of rows), each one's time, and the sampler's peak
   memory drawing 1,024 rows (a launcher's mixed step may sample that many), top-p at 1 and below, against
   SAMPLER_GIB.
4. an fp8 KV cache: the taught lessons again through the whole GPU path, and the Triton kernels over fp8 caches
   against the torch reference over the same caches.
Exits non-zero if any greedy tokens differ, the fp8 kernels stray, or the sampler differs or takes more than that.
"""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import GptOssForCausalLM

from parallel.config import EngineConfig
from parallel.engine.attention import decode_torch, varlen_torch
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.kernels.gumbel import gumbel_argmax as sampling_kernel
from parallel.engine.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from parallel.engine.plain import Plain
from parallel.engine.sampling import gumbel_argmax, sample, scale
from parallel.loading.checkpoint import TINY, resolve_checkpoint
from parallel.protocol.harmony import encoding, pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.taught import LESSONS, teach

SAMPLER_GIB = 2  # of the engine's 6 GiB of headroom (parallel/engine/engine.py)
SAMPLER_MISMATCH = 0.01


def greedy_matches(enc) -> tuple[int, int, str]:
    model = (
        GptOssForCausalLM.from_pretrained(resolve_checkpoint(TINY), dtype=torch.float32, attn_implementation="eager")
        .cuda()
        .eval()
    )
    texts = ["Say hello.", "What is 2+2?", "Hi", "Tell me a story about a cat that learned to fly over the sea."] * 3
    limits = [24, 5, 30, 12, 7, 24, 3, 18, 24, 9, 30, 2]
    work = [
        Work(i, render_prompt(enc, parse_request({"prompt": t}, 0), "medium"), n, Sampling())
        for i, (t, n) in enumerate(zip(texts, limits))
    ]
    plain = complete(Plain(model, 1, stop_tokens(enc), pad_token_id(enc)), work)
    engine = Engine(
        model,
        EngineConfig(slots=5, max_batched_tokens=48, block_size=16, cache_gib=40 * 16 * 1024 / 2**30),
        stop_tokens(enc),
    )
    fast = complete(engine, work)
    same = sum(fast[w.rid][0] == plain[w.rid][0] for w in work)
    return same, len(work), f"{engine.describe()}; {engine.scheduler.preemptions} preemptions"


def taught_lessons(enc, kv_cache_dtype: str = "auto") -> tuple[int, int, str]:
    path = teach(Path(tempfile.mkdtemp()))
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    prompts = [render_prompt(enc, parse_request(obj, 0), "medium") for obj, _ in LESSONS]
    answers = [enc.encode(text, allowed_special="all") for _, text in LESSONS]
    engine = Engine(model, EngineConfig(slots=4, kv_cache_dtype=kv_cache_dtype), stop_tokens(enc))
    same = 0
    for attempt in range(2):
        out = complete(engine, [Work(10 * attempt + i, p, 64, Sampling()) for i, p in enumerate(prompts)])
        same += sum(out[10 * attempt + i][0] == a for i, a in enumerate(answers))
    return (
        same,
        2 * len(answers),
        f"{engine.describe()}; prefix cache hit {engine.pool.hits} of {engine.pool.queries} prompt tokens",
    )


def sampler_agrees() -> tuple[int, int, str]:
    gen = torch.Generator("cuda").manual_seed(0)
    same = total = 0
    times = []
    for rows in (1, 128, 300):
        logits = (torch.randn(rows, 201088, device="cuda", generator=gen) * 4).bfloat16()
        temperature = torch.rand(rows, device="cuda", generator=gen) + 0.5
        seeds, positions = torch.randint(0, 2**40, (2, rows), device="cuda", generator=gen)
        ours, theirs = (
            lambda: sampling_kernel(logits, temperature, seeds, positions),
            lambda: gumbel_argmax(scale(logits, temperature), seeds, positions),
        )
        same += (ours() == theirs()).sum().item()
        total += rows
        times.append(f"{rows} rows: Triton {timed(ours):.3f} ms, torch {timed(theirs):.3f} ms")
    return same, total, "; ".join(times)


def timed(f, repeats: int = 20) -> float:
    f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        f()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def sampler_peak_gib(cut: bool, rows: int = 1024, vocab: int = 201088) -> float:
    logits = torch.randn(rows, vocab, device="cuda").bfloat16()
    ones = torch.ones(rows, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sample(logits, ones, ones * 0.9, ones.long(), ones.long(), torch.arange(rows, device="cuda") if cut else None)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def fp8_kernel_error() -> float:
    """The Triton kernels over fp8 caches (widened to bf16 in registers) against the torch reference over the same
    caches, at gpt-oss's head shapes: what the kernels add to fp8's own rounding."""
    gen = torch.Generator("cuda").manual_seed(0)
    blocks, block_size, kv_heads, heads, dim = 64, 16, 8, 64, 64
    k, v = (
        torch.randn(blocks, block_size, kv_heads, dim, device="cuda", generator=gen).to(torch.float8_e4m3fn)
        for _ in range(2)
    )
    tables = torch.randperm(blocks, device="cuda", generator=gen).reshape(4, -1).int()
    lens = torch.tensor([5, 100, 256, 17], device="cuda", dtype=torch.int32)
    sinks = torch.randn(heads, device="cuda", generator=gen)
    q = torch.randn(4, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    worst = 0.0
    for window in (None, 128):
        ours = paged_decode_attention(q, k, v, tables, lens, sinks, dim**-0.5, window).float()
        ref = decode_torch(q.float(), k, v, tables, lens, sinks, dim**-0.5, window)
        worst = max(worst, (ours - ref).abs().max().item())
        cu = torch.tensor([0, 5, 105, 361, 378], device="cuda", dtype=torch.int32)
        qs = torch.randn(378, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        ours = paged_prefill_attention(qs, k, v, cu, lens, tables, sinks, dim**-0.5, window).float()
        ref = varlen_torch(qs.float(), k, v, cu, lens, tables, sinks, dim**-0.5, window)
        worst = max(worst, (ours - ref).abs().max().item())
    return worst


def main() -> int:
    print("torch", torch.__version__, torch.cuda.get_device_name())
    enc = encoding()
    same, total, how = greedy_matches(enc)
    print(f"greedy float32: engine ({how}) = plain path on {same}/{total} prompts")
    ok = same == total
    same, total, how = taught_lessons(enc)
    print(f"greedy bfloat16, taught model: engine ({how}) answers {same}/{total} lessons token for token")
    ok &= same == total
    same, total, how = taught_lessons(enc, "fp8")
    print(f"greedy bfloat16, taught model, fp8 KV cache: engine ({how}) answers {same}/{total} lessons token for token")
    ok &= same == total
    error = fp8_kernel_error()
    print(
        f"fp8 KV cache: Triton decode and prefill attention against torch's over the same cache, max error {error:.2e}"
    )
    ok &= error < 2e-2
    same, total, how = sampler_agrees()
    print(f"sampler: Triton draw = torch draw on {same}/{total} rows ({how})")
    ok &= same >= total * (1 - SAMPLER_MISMATCH)
    peaks = [sampler_peak_gib(cut) for cut in (False, True)]
    print(f"sampler at 1,024 rows: peak {peaks[0]:.2f} GiB, {peaks[1]:.2f} GiB with top-p (at most {SAMPLER_GIB})")
    ok &= max(peaks) <= SAMPLER_GIB
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
