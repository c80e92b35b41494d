"""GPU check of experts kept in MXFP4 (parallel/engine/mxfp4.py) through triton_kernels (CI has no GPU; run by
hand; gpt-oss-120b on one GPU is measured by launch/bench.py, tests/gpu/run.sh's bench-120b):

    python tests/gpu/mxfp4_check.py

1. One MoE layer at gpt-oss-20b's shape (32 experts, hidden and intermediate 2880, top-4) and 120b's (128
   experts), 1 and 128 tokens, all experts and an ep share (the second half): triton_kernels' output, eager and
   replayed from a CUDA graph on new inputs, against a float32 reference on the same packed weights (relative L2
   error), beside torch's bf16 grouped_mm on the weights dequantized (the engine's bf16 path); a layer's time,
   each path replayed from a CUDA graph. An ep share must equal, bit for bit, the whole layer with the other
   experts' weights zero (its routes are the whole layer's, minus the others'). The ep shares again on EP_SEEDS
   more seeds of weights and inputs.
2. Many tokens, as a mixed step's graph holds (MANY): the same token MANY times, so that every route lands on the
   same 4 experts (a warm-up's padding does this), must give the one-token output in every row; MANY tokens routed
   at random must match the float32 reference on their first 128, and a graph replay must equal eager.
3. Why the converted scales end in zeros: 0xFF written after one projection's scales must change the output of
   exactly the tokens routed to a layer's last expert, and zeros again must give the layer's output back.
4. Greedy tokens: the taught tiny model (tests/taught.py) with its experts quantized to MXFP4, through the engine
   in bf16 (CUDA graphs, torch.compile) on the packed experts, against the same engine on them dequantized.
Exits non-zero if an error is over TOLERANCE (~3e-3 expected), a graph replay differs from eager, a share differs
from its zero-padded whole layer, a row of many tokens differs from its token alone, or a token differs.
"""

import gc
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GptOssForCausalLM

from parallel.config import EngineConfig
from parallel.engine.engine import Engine
from parallel.engine.forward import experts as engine_experts
from parallel.engine.interface import Sampling, Work, complete
from parallel.engine.mxfp4 import Mxfp4Experts, dequantize
from parallel.protocol.harmony import encoding, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request
from tests.mxfp4_files import quantize
from tests.taught import LESSONS, teach

HIDDEN = INNER = 2880
MATH = {"top_k": 4, "limit": 7.0, "alpha": 1.702}
TOLERANCE = 1e-2
EP_SEEDS = 4
MANY = 8192  # the engine's largest mixed step (engine.max_batched_tokens)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error; 0 where both are zero (a token none of whose experts this share holds)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def layer_inputs(experts: int, tokens: int, gen: torch.Generator):
    """Tokens and a router whose logits are exact in bf16 and float32 and never tie, so that every path picks the
    same experts and the errors measure the experts' arithmetic alone: expert e's logit is the token's feature e,
    and the first `experts` features are a permutation of distinct multiples of 1/64."""
    h = torch.randn(tokens, HIDDEN, device="cuda", generator=gen)
    h[:, :experts] = (torch.rand(tokens, experts, device="cuda", generator=gen).argsort(dim=1) + 1) / 64
    router_w = torch.eye(experts, HIDDEN, device="cuda", dtype=torch.bfloat16)
    return h.bfloat16(), router_w, torch.zeros(experts, device="cuda", dtype=torch.bfloat16)


def in_graph(fn, *static):
    """fn(*static) captured in a CUDA graph, warmed up beside it first (lazy inits, compiles) as the engine does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def replay_us(graph: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def zero_padded(share: Mxfp4Experts, total: int) -> Mxfp4Experts:
    """An ep share as the whole layer: the other experts' codes and biases zero (E2M1 code 0 is +0), on the kernel."""
    state = {}
    for name, t in share.state_dict().items():
        whole = torch.full(
            (total, *t.shape[1:]), 127 if name.endswith("_scales") else 0, dtype=t.dtype, device=t.device
        )
        whole[share.first_expert : share.first_expert + share.local] = t
        state[name] = whole
    with torch.device("cuda"):
        module = Mxfp4Experts(total, HIDDEN, INNER, **MATH)
    module.load_state_dict(state)
    module.prepare(torch.bfloat16)
    return module


@torch.no_grad()
def layer_rows(name: str, total: int, local: int, first: int, gen: torch.Generator) -> list[dict]:
    """A layer of `local` random experts from `first` on: both token counts, every path."""
    reference = Mxfp4Experts.random_packed(
        local, HIDDEN, INNER, device="cuda", dtype=torch.float32, first_expert=first, **MATH
    )
    with torch.device("cuda"):
        fast = Mxfp4Experts(local, HIDDEN, INNER, first_expert=first, **MATH)
    fast.load_state_dict(reference.state_dict())
    fast.prepare(torch.bfloat16)
    assert fast.kernel is not None, "triton_kernels did not take the experts"
    bf16 = (
        dequantize(reference.gate_up_proj_blocks, reference.gate_up_proj_scales, torch.bfloat16),
        reference.gate_up_proj_bias.bfloat16(),
        dequantize(reference.down_proj_blocks, reference.down_proj_scales, torch.bfloat16),
        reference.down_proj_bias.bfloat16(),
    )

    def grouped(h, router_w, router_b):
        return engine_experts(h, router_w, router_b, *bf16, first, MATH["top_k"], MATH["limit"], MATH["alpha"], True)

    rows = []
    for tokens in (1, 128):
        h, router_w, router_b = layer_inputs(total, tokens, gen)
        # Captured on one input, replayed on another: the routing must be recomputed inside the graph.
        static = layer_inputs(total, tokens, gen)[0]
        graph, graphed = in_graph(fast, static, router_w, router_b)
        static.copy_(h)
        graph.replay()
        truth, eager = reference(h.float(), router_w, router_b), fast(h, router_w, router_b)
        grouped_graph, _ = in_graph(grouped, h, router_w, router_b)
        whole = torch.equal(eager, zero_padded(reference, total)(h, router_w, router_b)) if local < total else True
        rows.append(
            dict(
                layer=f"{name} experts {first}-{first + local - 1} of {total}",
                tokens=tokens,
                whole=whole,
                mxfp4=relative(eager, truth),
                graph=relative(graphed, truth),
                same=torch.equal(graphed, eager),
                bf16=relative(grouped(h, router_w, router_b), truth),
                mxfp4_us=replay_us(graph),
                bf16_us=replay_us(grouped_graph),
            )
        )
        del graph, grouped_graph
    return rows


def layer_check() -> bool:
    """Every layer on seed 0's weights and inputs; the ep shares (their own routing metadata) on EP_SEEDS more."""
    print(
        f"{'layer':<34} {'tokens':>6} {'MXFP4 err':>9} {'in graph':>9} {'= eager':>7} {'= whole':>7} {'bf16 err':>9} "
        f"{'MXFP4 us':>9} {'bf16 us':>8}",
        flush=True,
    )
    ok = True
    cases = [
        (name, total, local, first, 0)
        for name, total in (("20b", 32), ("120b", 128))
        for local, first in ((total, 0), (total // 2, total // 2))
    ]
    cases += [
        (name, total, total // 2, total // 2, seed)
        for seed in range(1, EP_SEEDS + 1)
        for name, total in (("20b", 32), ("120b", 128))
    ]
    for name, total, local, first, seed in cases:
        torch.manual_seed(seed)
        gen = torch.Generator("cuda").manual_seed(seed)
        for r in layer_rows(name, total, local, first, gen):
            print(
                f"{r['layer']:<34} {r['tokens']:>6} {r['mxfp4']:>9.2e} {r['graph']:>9.2e} "
                f"{r['same']!s:>7} {r['whole']!s:>7} "
                f"{r['bf16']:>9.2e} {r['mxfp4_us']:>9.1f} {r['bf16_us']:>8.1f}  seed {seed}",
                flush=True,
            )
            ok &= r["mxfp4"] <= TOLERANCE and r["graph"] <= TOLERANCE and r["same"] and r["whole"]
        gc.collect()
        torch.cuda.empty_cache()
    return ok


@torch.no_grad()
def many_tokens_check() -> bool:
    """Whole layers of both shapes at MANY tokens: one token repeated (every route on its 4 experts), and random."""
    print(f"{'layer':<6} {'tokens':<20} {'worst row':>12} {'MXFP4 err':>9} {'= eager':>7} {'MXFP4 us':>9}", flush=True)
    ok = True
    for name, total in (("20b", 32), ("120b", 128)):
        torch.manual_seed(0)
        gen = torch.Generator("cuda").manual_seed(0)
        reference = Mxfp4Experts.random_packed(total, HIDDEN, INNER, device="cuda", dtype=torch.float32, **MATH)
        with torch.device("cuda"):
            fast = Mxfp4Experts(total, HIDDEN, INNER, **MATH)
        fast.load_state_dict(reference.state_dict())
        fast.prepare(torch.bfloat16)
        h, router_w, router_b = layer_inputs(total, MANY, gen)
        one = h[:1].clone()
        alone = fast(one, router_w, router_b)
        static = torch.zeros_like(h)
        graph, graphed = in_graph(fast, static, router_w, router_b)
        for kind, tokens in (("one token repeated", one.expand_as(h)), ("random", h)):
            static.copy_(tokens)
            graph.replay()
            eager = fast(tokens.contiguous(), router_w, router_b)
            # the worst row, not an average that 8,191 good rows would hide a bad one in
            rows = (
                ((graphed.float() - alone.float()).norm(dim=-1).max() / alone.float().norm()).item()
                if kind != "random"
                else 0
            )
            error = relative(graphed[:128], reference(tokens[:128].float(), router_w, router_b))
            same = torch.equal(graphed, eager)
            print(
                f"{name:<6} {kind:<20} {rows if kind != 'random' else '-':>12.3} {error:>9.2e} {same!s:>7} "
                f"{replay_us(graph, 10):>9.1f}",
                flush=True,
            )
            ok &= rows <= TOLERANCE and error <= TOLERANCE and same and bool(graphed.isfinite().all())
        torch.cuda.synchronize()  # an illegal access in any of it surfaces here, named
        del graph, reference, fast
        gc.collect()
        torch.cuda.empty_cache()
    return ok


@torch.no_grad()
def scale_tail_check() -> bool:
    """The reason for TAIL_BYTES (parallel/engine/mxfp4.py), seen: 0xFF (E8M0's NaN) written into the zero bytes after
    one projection's scales must change the output of exactly the tokens routed to the layer's last expert (the
    kernel's last K tile reads there: NaN through the down projection; through gate_up, whatever the SwiGLU's clamp
    makes of NaN), and zeros again must give the output back."""
    ok = True
    for name, total in (("20b", 32), ("120b", 128)):
        torch.manual_seed(0)
        gen = torch.Generator("cuda").manual_seed(0)
        fast = Mxfp4Experts.random_packed(total, HIDDEN, INNER, device="cuda", dtype=torch.bfloat16, **MATH)
        h, router_w, router_b = layer_inputs(total, 128, gen)
        clean = fast(h, router_w, router_b)
        last = (torch.topk(F.linear(h, router_w, router_b), MATH["top_k"]).indices == total - 1).any(-1)
        for projection, config in (("gate_up", fast.kernel.gate_up_precision), ("down", fast.kernel.down_precision)):
            scales = config.weight_scale.storage.data
            tail = torch.empty(0, dtype=torch.uint8, device="cuda").set_(scales.untyped_storage())[scales.numel() :]
            tail.fill_(0xFF)
            out = fast(h, router_w, router_b)
            tail.zero_()
            changed, finite = (out != clean).any(-1), out.isfinite().all(-1)
            print(
                f"{name} {projection}: 0xFF after the scales changed {int(changed.sum())} tokens "
                f"({int((~finite).sum())} "
                f"to NaN); {int(last.sum())} are routed to the last expert",
                flush=True,
            )
            ok &= torch.equal(changed, last)
        again = fast(h, router_w, router_b)
        print(f"{name}: zeros again give the output back: {torch.equal(again, clean)}", flush=True)
        ok &= bool(last.any()) and torch.equal(again, clean)
        del fast
        gc.collect()
        torch.cuda.empty_cache()
    return ok


def packed_twin(experts, config) -> Mxfp4Experts:
    """A layer's float experts quantized to MXFP4, as Mxfp4Experts on the GPU; the float ones are set to the
    values those dequantize to, so that both hold the same weights."""
    with torch.device("cuda"):
        packed = Mxfp4Experts(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            top_k=config.num_experts_per_tok,
            limit=config.swiglu_limit,
            alpha=config.swiglu_alpha,
        )
    state = {}
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        state[f"{name}_blocks"], state[f"{name}_scales"], dequantized = quantize(weight.detach().float().cpu())
        state[f"{name}_bias"] = getattr(experts, f"{name}_bias").float()
        weight.data.copy_(dequantized)
    packed.load_state_dict(state)
    packed.prepare(torch.bfloat16)
    return packed


def greedy_check() -> bool:
    enc = encoding()
    model = (
        GptOssForCausalLM.from_pretrained(
            teach(Path(tempfile.mkdtemp()), device="cuda"), dtype=torch.bfloat16, attn_implementation="eager"
        )
        .cuda()
        .eval()
    )
    prompts = [render_prompt(enc, parse_request(obj, 0), "medium") for obj, _ in LESSONS]
    answers = [enc.encode(text, allowed_special="all") for _, text in LESSONS]
    twins = [packed_twin(layer.mlp.experts, model.config) for layer in model.model.layers]
    runs = {}
    for kind in ("dequantized", "mxfp4"):
        if kind == "mxfp4":
            for layer, packed in zip(model.model.layers, twins):
                layer.mlp.experts = packed
        engine = Engine(model, EngineConfig(slots=2, cache_gib=4), stop_tokens(enc))  # the first still holds its cache
        out = complete(engine, [Work(i, p, 64, Sampling()) for i, p in enumerate(prompts)])
        runs[kind] = [out[i][0] for i in range(len(prompts))]
        print(
            f"engine, {kind} experts ({engine.describe()}): {sum(t == a for t, a in zip(runs[kind], answers))}/"
            f"{len(answers)} lessons answered token for token",
            flush=True,
        )
    same = sum(a == b for a, b in zip(runs["mxfp4"], runs["dequantized"]))
    print(f"greedy bf16: MXFP4 experts = dequantized experts on {same}/{len(prompts)} prompts", flush=True)
    return same == len(prompts)


def main() -> int:
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    checks = [scale_tail_check, layer_check, many_tokens_check, greedy_check]
    ok = True
    for check in checks:
        ok &= check()
        gc.collect()
        torch.cuda.empty_cache()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
