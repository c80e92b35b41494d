"""GPU check of an engine's start, every CUDA graph's warm-ups and capture, then steps of mixed prompt lengths, on a
gpt-oss-120b-shaped model cut to --layers layers (random weights, MXFP4 experts through triton_kernels), through
the loading path users run. Made to run under compute-sanitizer, which names any kernel that reads or writes out
of bounds (memcheck) or reads memory nothing wrote (initcheck); --starts N starts N engines in turn, for a fault
that comes and goes:

    compute-sanitizer --tool memcheck python tests/gpu/start_check.py --layers 2
    python tests/gpu/start_check.py --layers 36 --starts 10

Exits non-zero on any CUDA error (and compute-sanitizer on any report, with --error-exitcode).
"""

import argparse
import sys
import tempfile
import time

import torch

from launch.bench import loaded
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.loading.checkpoint import read_model_config
from parallel.protocol.harmony import encoding, stop_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--starts", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.slots=64")
    args = parser.parse_args()

    shape = read_model_config("builtin:gpt-oss-120b")
    shape.num_hidden_layers = args.layers
    shape.layer_types = shape.layer_types[: args.layers]
    shape.quantization_config = {"quant_method": "mxfp4"}  # so that dummy weights come as MXFP4 experts
    folder = tempfile.mkdtemp()
    shape.save_pretrained(folder)
    cfg, model = loaded(
        "configs/gpt-oss-120b.yaml", (f"model.path={folder}", "model.load_format=dummy", *args.overrides)
    )
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.layers} layers of gpt-oss-120b's shape",
        flush=True,
    )
    enc = encoding()
    # prompts of 1 to ~3,000 tokens: decode rows, short and long prompt chunks in one step
    work = [
        Work(i, [200006 + i % 7] + list(range(1000, 1000 + n)), 16, Sampling(temperature=1.0, seed=i))
        for i, n in enumerate((0, 7, 100, 500, 3000, 31))
    ]
    for start in range(args.starts):
        began = time.perf_counter()
        engine = Engine(model, cfg.engine, stop_tokens(enc))
        out = complete(engine, work)
        torch.cuda.synchronize()
        print(
            f"start {start + 1}: {engine.describe()}; {time.perf_counter() - began:.1f} s; "
            f"{sum(len(t) for t, _ in out.values())} tokens",
            flush=True,
        )
        del engine
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
