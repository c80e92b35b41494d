"""The plain transformers recipe against our engine, in one process, on the same model and prompts.

    python launch/bench.py --config configs/gpt-oss-20b.yaml --batch-sizes 1 128 --new-tokens 256 \
        --out bench.json model.path=builtin:gpt-oss-20b model.load_format=dummy

For each batch size: harmony-rendered prompts (~80 tokens), every request run to exactly --new-tokens
(stop tokens ignored, so both sides make the same number of tokens), first the plain path
(`model.generate`, left-padded, the model's own attention and experts), then the engine (parallel/engine.py)
with a slot a request, once per decode attention in --attention, each after one short warm-up run. Prints a table (tokens/s, time to first token, peak memory, speed-up,
fraction of the memory-bandwidth floor) and writes it as JSON. One GPU, the whole model (dp layouts).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from parallel.config import Attention, merge_config, parse_args_and_overrides
from parallel.distributed.loading import load_model, plan_model
from parallel.distributed.mesh import build_mesh, init_distributed
from parallel.engine.engine import Engine
from parallel.engine.plain import generate
from parallel.log import log
from parallel.protocol.harmony import encoding, pad_token_id, render_prompt
from parallel.protocol.requests import parse_request

PROMPT = "Write a long story about topic number {}, with a title, three characters and a twist at the end."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="the GPU's memory bandwidth, for the floor")
    parser.add_argument("--skip-plain", action="store_true", help="engine only (the plain recipe is slow)")
    parser.add_argument("--attention", nargs="+", default=["auto"], choices=[a.value for a in Attention],
                        help="the engine's decode attentions to measure, a column each")
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parse_args_and_overrides(parser)

    cfg, shape, model, device = load(args.config, args.overrides)
    enc = encoding()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"{machine}; {describe(shape, model)}")

    rows = []
    for batch in args.batch_sizes:
        prompts = [render_prompt(enc, parse_request({"prompt": PROMPT.format(i)}, 0), cfg.generation.reasoning_effort) for i in range(batch)]
        limits = [args.new_tokens] * batch
        row = {"batch": batch, "prompt_tokens": sum(map(len, prompts)) // batch, "new_tokens": args.new_tokens, "paths": {},
               "floor_tokens_per_s": bandwidth_floor(shape, model, batch, args.bandwidth_tbs)}
        if not args.skip_plain:
            plain = partial(generate, model, gen=cfg.generation, stop={}, pad_id=pad_token_id(enc), seed=0)
            row["paths"]["plain"] = measure(plain, prompts, limits, device)
        for attention in args.attention:
            # A fresh engine a column (rebinding frees the last one's cache), its cache sized for this run before
            # warming up.
            engine = Engine(model, batch, cfg.engine.cuda_graphs, cfg.engine.compile, attention=attention, cache_gib=cfg.engine.cache_gib)
            engine.reserve(max(map(len, prompts)) + args.new_tokens)
            name = "engine" if len(args.attention) == 1 else f"engine ({attention} attention)"
            result = measure(partial(engine.generate, gen=cfg.generation, stop={}, seed=0), prompts, limits, device)
            result["of_floor"] = round(result["tokens_per_s"] / row["floor_tokens_per_s"], 3)
            if "plain" in row["paths"]:
                result["speedup"] = round(result["tokens_per_s"] / row["paths"]["plain"]["tokens_per_s"], 2)
            row["paths"][name] = {**result, "engine": engine.describe()}
        rows.append(row)
        log(json.dumps(row))

    print(table(rows, machine, shape, model, args))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "model": describe(shape, model),
                                        "attention_plain": model.config._attn_implementation, "rows": rows}, indent=2) + "\n")


def load(config: str, overrides: list[str]):
    """The job's config, the model's shape, the model (one process: the whole model) and its device."""
    cfg = merge_config(config, overrides)
    path, shape, layout = plan_model(cfg)
    _, device = init_distributed(cfg.runtime.collective_timeout_s)
    return cfg, shape, load_model(path, shape, cfg.model, layout, build_mesh(layout, device)), device


def measure(run, prompts: list[list[int]], limits: list[int], device: torch.device) -> dict:
    """One timed run of run(prompts, limits), after a 4-token warm-up (lazy initialisation, graph capture,
    compilation, cuBLAS heuristics)."""
    run(prompts, [4] * len(prompts))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    _, timing = run(prompts, limits)
    seconds = time.perf_counter() - start
    tokens = sum(limits)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"tokens_per_s": round(tokens / seconds, 1), "time_to_first_token_s": round(timing.first_token_s, 3),
            "seconds": round(seconds, 2), "peak_gib": round(peak, 1)}


def describe(shape, model) -> str:
    return (f"gpt-oss {shape.num_hidden_layers} layers x {shape.num_local_experts} experts, "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.1f}B params, {model.dtype}")


def bandwidth_floor(shape, model, batch: int, tbs: float) -> float:
    """Tokens/s if a decode step only had to read its weights once at full bandwidth: the dense weights plus
    the experts a batch of this size touches (expected number, routing uniform)."""
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dense = sum(p.numel() for p in model.parameters()) - expert_params
    per_expert = expert_params / shape.num_hidden_layers / shape.num_local_experts
    e, k = shape.num_local_experts, shape.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    # The embedding table is read one row a token, not whole.
    dense -= model.model.embed_tokens.weight.numel()
    step_bytes = (dense + shape.num_hidden_layers * touched * per_expert) * model.dtype.itemsize
    return round(batch / (step_bytes / (tbs * 1e12)), 1)


def table(rows: list[dict], machine: str, shape, model, args) -> str:
    lines = [f"{machine}, {describe(shape, model)}, random weights, {args.new_tokens} new tokens a request", "",
             "| batch | prompt tokens | path | tokens/s | time to first token (s) | peak GiB | speed-up | of bandwidth floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, m in r["paths"].items():
            extra = ("1x", "") if name == "plain" else (f"{m.get('speedup', '-')}x", f"{m['of_floor']:.0%} of {r['floor_tokens_per_s']:.0f}")
            lines.append(f"| {r['batch']} | {r['prompt_tokens']} | {name} | {m['tokens_per_s']} | {m['time_to_first_token_s']} | {m['peak_gib']} | {extra[0]} | {extra[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
