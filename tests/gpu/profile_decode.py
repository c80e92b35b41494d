"""Where a decode step of the engine spends its time, on a GPU: the CUDA kernels of `--steps` steps, grouped by
name, for each batch size (every sequence `--position` tokens in).

    python tests/gpu/profile_decode.py --config configs/gpt-oss-20b.yaml --batch-sizes 1 128 \
        model.path=builtin:gpt-oss-20b model.load_format=dummy
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from parallel.config import merge_config, parse_args_and_overrides
from parallel.distributed.loading import load_model, plan_model
from parallel.distributed.mesh import build_mesh, init_distributed
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--position", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parse_args_and_overrides(parser)
    cfg = merge_config(args.config, args.overrides)
    path, shape, layout = plan_model(cfg)
    _, device = init_distributed(cfg.runtime.collective_timeout_s)
    model = load_model(path, shape, cfg.model, layout, build_mesh(layout, device))
    for batch in args.batch_sizes:
        engine = Engine(model, cfg.engine, stop={})
        prompt = torch.randint(1000, 100000, (args.position,)).tolist()
        engine.add([Work(i, prompt, 10**6, Sampling(ignore_eos=True)) for i in range(batch)])
        while any(s.computed < len(s.tokens) - 1 for s in engine.sequences.values()) or len(engine.scheduler.running) < batch:
            engine.step(lambda events: None)
        engine.step(lambda events: None)  # the decode graph for this batch, captured outside the measurement
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step(lambda events: None)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step(lambda events: None)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.device_time_total for e in kernels) / args.steps / 1e3
        print(f"\nbatch {batch}: {step_ms:.2f} ms a step ({batch / step_ms * 1e3:.0f} tok/s), GPU kernels {total:.2f} ms "
              f"(the rest is host work); {engine.describe()}")
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[: args.top]:
            ms = e.device_time_total / args.steps / 1e3
            print(f"  {ms:7.3f} ms {ms / total:5.1%} x{e.count // args.steps:<4} {e.key[:110]}")
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
