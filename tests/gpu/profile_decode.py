"""Where a decode step of the engine spends its time, on a GPU: the CUDA kernels of `--steps` graph replays,
grouped by name, for each batch size (all sequences at position `--position`).

    python tests/gpu/profile_decode.py --config configs/gpt-oss-20b.yaml --batch-sizes 1 128 \
        model.path=builtin:gpt-oss-20b model.load_format=dummy
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from launch.bench import load
from parallel.config import parse_args_and_overrides
from parallel.engine.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--position", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parse_args_and_overrides(parser)
    cfg, shape, model, device = load(args.config, args.overrides)
    for batch in args.batch_sizes:
        engine = Engine(model, batch, attention=cfg.engine.attention)
        engine.reserve(args.position + 1)
        tokens = torch.randint(0, shape.vocab_size, (batch,), device=device)
        positions = torch.full((batch,), args.position, device=device)
        engine._decode(tokens, positions)  # capture and compile outside the measurement
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine._decode(tokens, positions)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine._decode(tokens, positions)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.device_time_total for e in kernels) / args.steps / 1e3
        print(f"\nbatch {batch}: {step_ms:.2f} ms a step ({batch / step_ms * 1e3:.0f} tok/s), kernels {total:.2f} ms; "
              f"{engine.describe()}")
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[: args.top]:
            ms = e.device_time_total / args.steps / 1e3
            print(f"  {ms:7.3f} ms {ms / total:5.1%} x{e.count // args.steps:<4} {e.key[:110]}")


if __name__ == "__main__":
    main()
