"""GPU check of the engine (CI has no GPU; run by hand and record the output in docs/performance.md):

    python tests/gpu/engine_check.py

1. attention with sinks and sliding windows: the decode kernel (parallel/decode_attention.py) in bf16 at
   gpt-oss-20b's head shapes, 1 to 4096 keys, against torch attention in bf16, both relative to float32; then
   the logits of a 2-layer gpt-oss (one sliding, one full layer, window 16, 100-token prompt) through the
   engine (decode attention in torch and in the kernel), and through flash-attn-4 where installed, against
   eager attention, relative to a float32 eager reference;
2. greedy tokens: the engine (continuous batching over fewer slots than prompts) against the plain path
   (`model.generate`) on the tiny checkpoint in float32 (expert loop, no graphs): every token the same;
3. the taught tiny model (tests/taught.py) in bfloat16 through the engine's GPU path (grouped_mm, CUDA
   graphs, torch.compile, the decode kernel): its three lessons answered token for token. (The random tiny model's logits are
   too close in bf16 for exact comparisons between two implementations; the taught one's are not.)
Exits non-zero if a fast path's error is over 1.5x eager bf16's own, or if any tokens differ.
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GptOssForCausalLM

from parallel.config import GenerationConfig
from parallel.distributed.checkpoint import TINY, resolve_checkpoint
from parallel.engine.engine import Engine
from parallel.engine.kernels.decode_attention import decode_attention
from parallel.engine.plain import generate
from parallel.protocol.harmony import encoding, pad_token_id, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.attention_reference import torch_attention
from tests.taught import LESSONS, teach

# bf16 rounding alone moves this model's wide logits by eager bf16's error against float32; a fast path may
# differ from float32 by that much again, not more.
TOLERANCE = 1.5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attention_errors(path: str, ids: torch.Tensor) -> dict[str, float]:
    """Relative errors of the logits after tokens 59..98 (where both windows are full), each path in bf16."""
    reference = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").cuda()
    with torch.no_grad():
        truth = reference(ids).logits
    errors = {}
    fa4 = importlib.util.find_spec("flash_attn") and importlib.util.find_spec("flash_attn.cute")
    kinds = ["eager"] + (["flash_attention_4"] if fa4 else [])
    for kind in kinds:
        model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=kind).cuda()
        with torch.no_grad():
            errors[f"{kind} (bf16)"] = relative(model(ids).logits[:, 59:-1], truth[:, 59:-1])
    for attention in ("torch", "triton"):
        engine = Engine(model, slots=1, attention=attention)
        engine.reserve(ids.shape[1])
        with torch.no_grad():
            # the prompt's first 60 tokens as a prefill (logits after token 59), the other 40 one decode step at
            # a time through the CUDA graph: both code paths, against the logits after tokens 59..99
            logits = [engine.forward(ids[:, :60], slice(0, 1), torch.zeros(1, dtype=torch.long, device="cuda"), 60)]
            for t in range(60, ids.shape[1] - 1):
                # cloned: a graph's output buffer is overwritten by its next replay
                logits.append(engine._decode(ids[:, t], torch.tensor([t], device="cuda")).clone())
        errors[f"engine, {attention} decode attention (bf16, prefill + decode)"] = relative(torch.stack(logits, 1), truth[:, 59:-1])
    return errors


def kernel_errors() -> dict[str, float]:
    """The decode kernel at gpt-oss-20b's head shapes (64 query heads, 8 KV heads, 64 dims, sinks), sequences of
    1 to 4096 keys, full and 128-token window: relative error vs attention in float32, beside torch's in bf16."""
    gen = torch.Generator("cuda").manual_seed(0)
    k_cache, v_cache = torch.randn(2, 6, 8, 4096, 64, device="cuda", generator=gen).unbind(0)
    q, sinks = torch.randn(5, 64, 64, device="cuda", generator=gen), torch.randn(64, device="cuda", generator=gen)
    lengths = torch.tensor([1, 100, 129, 2048, 4096], device="cuda")
    errors = {}
    for window in (None, 128):
        truth = torch_attention(q, k_cache, v_cache, lengths, sinks, 0.125, window)
        bf16 = [t.bfloat16() for t in (q, k_cache, v_cache)]
        errors[f"torch, window {window}"] = relative(torch_attention(*bf16, lengths, sinks, 0.125, window), truth)
        errors[f"kernel, window {window}"] = relative(decode_attention(*bf16, lengths, sinks, 0.125, window), truth)
    return errors


def greedy_matches(path: str) -> tuple[int, int, str]:
    enc = encoding()
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    texts = ["Say hello.", "What is 2+2?", "Hi", "Tell me a story about a cat that learned to fly over the sea."] * 3
    prompts = [render_prompt(enc, parse_request({"prompt": t}, 0), "medium") for t in texts]
    limits = [24, 5, 30, 12, 7, 24, 3, 18, 24, 9, 30, 2]
    stop, gen = stop_tokens(enc), GenerationConfig()
    plain = [generate(model, [p], [n], gen, stop=stop, pad_id=pad_token_id(enc), seed=0)[0][0].tokens for p, n in zip(prompts, limits)]
    engine = Engine(model, slots=5)
    fast, _ = engine.generate(prompts, limits, gen, stop=stop, seed=0)
    return sum(a.tokens == b for a, b in zip(fast, plain)), len(prompts), engine.describe()


def taught_lessons() -> tuple[int, int, str]:
    enc = encoding()
    path = teach(Path(tempfile.mkdtemp()))
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    prompts = [render_prompt(enc, parse_request(obj, 0), "medium") for obj, _ in LESSONS]
    answers = [enc.encode(text, allowed_special="all") for _, text in LESSONS]
    engine = Engine(model, slots=2)
    fast, _ = engine.generate(prompts, [64] * len(prompts), GenerationConfig(), stop=stop_tokens(enc), seed=0)
    return sum(c.tokens == a for c, a in zip(fast, answers)), len(answers), engine.describe()


def main() -> int:
    path = resolve_checkpoint(TINY)
    print("torch", torch.__version__, torch.cuda.get_device_name())
    ids = torch.randint(0, 200000, (1, 100), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ok = True
    errors = kernel_errors()
    for name, err in errors.items():
        print(f"decode attention {name} (bf16): relative error vs float32 {err:.2e}")
        torch_name = name.replace("kernel", "torch")
        ok &= err <= TOLERANCE * errors[torch_name]
    errors = attention_errors(path, ids)
    for name, err in errors.items():
        print(f"attention {name}: relative error of the logits vs float32 eager {err:.2e}")
        ok &= err <= TOLERANCE * errors["eager (bf16)"]
    same, total, how = greedy_matches(path)
    print(f"greedy float32: engine ({how}) = plain path on {same}/{total} prompts")
    ok &= same == total
    same, total, how = taught_lessons()
    print(f"greedy bfloat16, taught model: engine ({how}) answers {same}/{total} lessons token for token")
    ok &= same == total
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
