"""Where a step of the engine spends its time, on a GPU, for each batch size (every sequence `--position` tokens
in): a decode-only step (its CUDA graph) and a mixed step (the same decode rows plus one new `--prompt`-token
prompt), each as wall time a step and the CUDA kernels of `--steps` steps grouped by name.

    python tests/gpu/profile_decode.py --config configs/gpt-oss-20b.yaml --batch-sizes 1 128 \
        model.path=builtin:gpt-oss-20b model.load_format=dummy
"""

import argparse
import itertools
import time

import torch
from torch.profiler import ProfilerActivity, profile

from parallel.config import merge_config, parse_args_and_overrides
from parallel.distributed.mesh import build_mesh, init_distributed
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work
from parallel.loading.model import load_model, plan_model

ids = itertools.count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--position", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=250)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parse_args_and_overrides(parser)
    cfg = merge_config(args.config, args.overrides)
    path, shape, layout = plan_model(cfg)
    _, device = init_distributed(cfg.runtime.collective_timeout_s)
    model = load_model(path, shape, cfg.model, layout, build_mesh(layout, device))
    for batch in args.batch_sizes:
        engine = Engine(model, cfg.engine, stop={})
        engine.add([request(args.position, 4096) for _ in range(batch)])
        while any(s.computed < len(s.tokens) - 1 for s in engine.sequences.values()):
            engine.step(ignore)
        measure(engine, f"batch {batch}, decode-only", lambda: None, args)
        measure(
            engine,
            f"batch {batch} + one {args.prompt}-token prompt",
            lambda: engine.add([request(args.prompt, 1)]),
            args,
        )
        engine = None  # its cache freed before the next one takes the memory
        torch.cuda.empty_cache()


def request(prompt: int, new: int) -> Work:
    return Work(next(ids), torch.randint(1000, 100000, (prompt,)).tolist(), new, Sampling(ignore_eos=True))


def ignore(events) -> None:
    pass


def measure(engine: Engine, what: str, before_step, args) -> None:
    before_step()
    engine.step(ignore)  # warm-up: compilation for this shape
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        before_step()
        engine.step(ignore)
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            before_step()
            engine.step(ignore)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in kernels) / args.steps / 1e3
    print(
        f"\n{what}: {step_ms:.2f} ms a step, GPU kernels {total:.2f} ms (the rest is host work); {engine.describe()}",
        flush=True,
    )
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[: args.top]:
        ms = e.device_time_total / args.steps / 1e3
        print(f"  {ms:7.3f} ms {ms / total:5.1%} x{e.count // args.steps:<4} {e.key[:110]}", flush=True)


if __name__ == "__main__":
    main()
