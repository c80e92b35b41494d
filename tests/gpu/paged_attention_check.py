"""GPU check of the paged attention kernels (parallel/engine/kernels/paged_attention.py; CI has no GPU: run by hand
on an H100 and record the output in docs/benchmarks.md):

    python tests/gpu/paged_attention_check.py [--out results.json]

At gpt-oss's head shapes (64 query heads, 8 KV heads, head_dim 64, sinks, block_size 16, random scattered
block tables, unused cache blocks NaN), for the full and the 128-token sliding window:
1. errors in bf16 against the float32 reference (parallel/engine/attention.py's torch reference), for every
   configuration timed;
   decode also replayed from a CUDA graph after its lengths and block tables changed in place;
2. decode timings, batch 1/64/256 x 256..8k keys, in a CUDA graph over several layers' caches (a cold L2, as in
   a real step), with the K/V bytes read a second against the H100's ~3 TB/s;
3. prefill timings: 64 x 2k prompts, 1 x 8k prompt, 256 mixed rows (decode rows and prompt chunks), in
   TFLOP/s of the causal work (against ~800 dense bf16 TFLOP/s).
Each part tries several tile configurations and names the fastest by geometric-mean time; exits non-zero if an
error is over 1e-2 or NaN. `--smoke` runs everything tiny on CPU under Triton's interpreter (checks the script).
"""

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import triton

from parallel.engine.attention import slot_mapping, varlen_torch
from parallel.engine.kernels import paged_attention as pa

HEADS, KV_HEADS, DIM, BLOCK_SIZE, WINDOW = 64, 8, 64, 16, 128
SCALING = DIM**-0.5
DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = torch.float32 if SMOKE else torch.bfloat16
MAX_ERROR = 1e-2
# One change at a time from the defaults; the best value of each is then tried together.
DECODE_TRIES = [
    {},
    {"num_stages": 3},
    {"num_warps": 2},
    {"BLOCK_N": 128},
    {"BLOCK_N": 32},
    {"PROGRAMS": 528},
    {"PROGRAMS": 1056},
]
PREFILL_TRIES = [
    {},
    {"num_warps": 4},
    {"BLOCK_N": 128, "num_stages": 2},
    {"BLOCK_M": 64},
    {"BLOCK_N": 32, "num_stages": 4},
    {"BLOCK_M": 256, "num_stages": 2},
    {"num_stages": 2},
]
GEN = torch.Generator(DEVICE).manual_seed(0)


class Paged:
    """A batch of sequences in a paged cache of `layers` layers: rows (queries, sequence length) ->
    cu_seqlens_q, seq_lens, scattered block tables (past a sequence: a NaN block), K/V caches (NaN beyond the
    written tokens)."""

    def __init__(self, rows, layers=1):
        self.rows, self.layers = rows, layers
        q_lens = torch.tensor([q for q, _ in rows], device=DEVICE)
        self.seq_lens = torch.tensor([n for _, n in rows], dtype=torch.int32, device=DEVICE)
        self.cu_seqlens_q = torch.nn.functional.pad(q_lens.cumsum(0), (1, 0)).int()
        blocks = (self.seq_lens.long() + BLOCK_SIZE - 1) // BLOCK_SIZE
        order = torch.randperm(int(blocks.sum()) + 1, device=DEVICE, generator=GEN).int()
        self.tables = torch.full((len(rows), int(blocks.max())), order[-1].item(), dtype=torch.int32, device=DEVICE)
        seq = torch.repeat_interleave(torch.arange(len(rows), device=DEVICE), blocks)
        index = torch.arange(len(seq), device=DEVICE) - (blocks.cumsum(0) - blocks)[seq]
        self.tables[seq, index] = order[:-1]
        seq = torch.repeat_interleave(torch.arange(len(rows), device=DEVICE), self.seq_lens.long())
        positions = torch.arange(len(seq), device=DEVICE) - (self.seq_lens.long().cumsum(0) - self.seq_lens)[seq]
        slots = slot_mapping(self.tables, seq, positions, BLOCK_SIZE)
        shape = (len(order), BLOCK_SIZE, KV_HEADS, DIM)
        self.caches = []
        for _ in range(layers):
            k, v = (torch.full(shape, float("nan"), dtype=DTYPE, device=DEVICE) for _ in range(2))
            kv = torch.randn(2, len(slots), KV_HEADS, DIM, device=DEVICE, generator=GEN)
            k.view(-1, KV_HEADS, DIM)[slots], v.view(-1, KV_HEADS, DIM)[slots] = kv.to(DTYPE)
            self.caches.append((k, v))
        self.q = torch.randn(int(q_lens.sum()), HEADS, DIM, device=DEVICE, generator=GEN).to(DTYPE)
        self.sinks = torch.randn(HEADS, device=DEVICE, generator=GEN).to(DTYPE)

    def keys_seen(self, window):
        """Keys seen summed over queries (the work), and over sequences each key once (the bytes)."""
        work = once = 0
        for q, n in self.rows:
            work += (torch.arange(n - q, n, dtype=torch.float64) + 1).clamp(max=window or n).sum().item()
            once += n - max(0, n - q - (window or n) + 1)
        return work, once

    def reference(self, window):
        k, v = (c.float() for c in self.caches[0])
        return varlen_torch(
            self.q.float(), k, v, self.cu_seqlens_q, self.seq_lens, self.tables, self.sinks.float(), SCALING, window
        )


def relative(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def timed(fn):
    """Median milliseconds of fn: replays of a CUDA graph of it (triton's do_bench, L2 flushed before each);
    on CPU (--smoke), one call."""
    fn()
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median")


def decode(batch, config, window):
    return lambda: [
        pa.paged_decode_attention(batch.q, k, v, batch.tables, batch.seq_lens, batch.sinks, SCALING, window, config)
        for k, v in batch.caches
    ]


def prefill(batch, config, window):
    return lambda: [
        pa.paged_prefill_attention(
            batch.q, k, v, batch.cu_seqlens_q, batch.seq_lens, batch.tables, batch.sinks, SCALING, window, config
        )
        for k, v in batch.caches
    ]


def graph_replay_error(window):
    """Decode captured in a CUDA graph for one batch, replayed after another batch of the same shapes was
    copied into its inputs (queries, lengths, tables; the layer's sinks stay): the graph must follow them."""
    first, second = Paged([(1, n) for n in (5, 300, 1000, 77)]), Paged([(1, n) for n in (900, 1, 64, 1000)])
    second.sinks = first.sinks  # a weight of the layer, not an input of the step
    second.tables += len(first.caches[0][0])  # one cache for both: second's blocks after first's
    first.caches = second.caches = [tuple(torch.cat(pair) for pair in zip(*first.caches, *second.caches))]
    if SMOKE:
        return relative(decode(second, None, window)()[0], second.reference(window))
    decode(first, None, window)()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode(first, None, window)()[0]
    for mine, theirs in zip([first.q, first.tables, first.seq_lens], [second.q, second.tables, second.seq_lens]):
        mine.copy_(theirs)
    graph.replay()
    return relative(out, second.reference(window))


def decode_shapes():
    """(name, batch, window): batch 1/64/256 x 256..8k keys, full; the 128-token window at 8k. Each batch gets
    enough layers (up to gpt-oss-20b's 24) that one graph replay reads ~1 GiB or more."""
    shapes = []
    for size in (1, 2) if SMOKE else (1, 64, 256):
        for keys in (40, 200) if SMOKE else (256, 1024, 2048, 8192):
            layers = 1 if SMOKE else min(24, max(1, 2**30 // (size * keys * KV_HEADS * DIM * 4)))
            batch = Paged([(1, keys)] * size, layers)
            shapes += [(f"{size} x {keys}", batch, None)] + (
                [(f"{size} x {keys}", batch, WINDOW)] if keys == 8192 else []
            )
    return shapes


def prefill_shapes():
    """(name, batch, window): 64 x 2k prompts, one 8k prompt, 256 mixed rows (240 decode rows at 256..4k keys,
    16 chunks of 512 queries after 0..2k keys), each with the full and the 128-token window."""
    mixed = [(1, int(n)) for n in torch.randint(256, 4097, (240,), generator=torch.Generator().manual_seed(1))]
    mixed += [(512, 512 + int(n)) for n in torch.randint(0, 2049, (16,), generator=torch.Generator().manual_seed(2))]
    cases = {"64 x 2k": [(2048, 2048)] * 64, "1 x 8k": [(8192, 8192)], "256 mixed": mixed}
    if SMOKE:
        cases = {"2 x 64": [(64, 64)] * 2, "mixed": [(1, 50), (20, 90)]}
    return [
        (name, batch, window) for name, rows in cases.items() for batch in [Paged(rows)] for window in (None, WINDOW)
    ]


def error_batches():
    """Small batches for the errors against float32: decode rows of 1 to 8k keys; prompts, chunks, decode rows."""
    if SMOKE:
        return Paged([(1, 1), (1, 70)]), Paged([(1, 40), (30, 60), (8, 8)])
    return (
        Paged([(1, n) for n in (1, 100, 129, 1000, 2048, 4096, 8000, 8192)]),
        Paged([(1, 3000), (512, 2048), (2048, 2048), (300, 1000), (1, 1), (7, 7), (100, 4000)]),
    )


def label(config):
    return ",".join(f"{k}={v}" for k, v in config.items()) or "defaults"


def warm(part_name, config):
    """Compiles one configuration in a worker process: a small batch through it fills Triton's disk cache."""
    try:
        rows = [(1, 300), (1, 5)] if part_name == "decode" else [(1, 40), (20, 300)]
        globals()[part_name](Paged(rows), config, None)()
        if not SMOKE:
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the measurement names the failure; this only saves compile time
        traceback.print_exc()


def precompile(tries):
    """Every (part, config) compiled in parallel processes before anything is timed: the timed process then
    loads the kernels from Triton's cache instead of compiling them one after another."""
    jobs = [(part, config) for part, configs in tries for config in configs]
    with ProcessPoolExecutor(min(len(jobs), 12), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(warm, *zip(*jobs)))


def measure(part, tries, shapes, error_batch, deadline):
    """{label: (config, {window: error}, {(shape, window): ms a layer})} for each configuration tried before the
    deadline: errors on error_batch against float32, times on every shape. A failing configuration is named
    and skipped."""
    truths = {w: error_batch.reference(w) for w in (None, WINDOW)}
    table = {}
    for config in tries:
        if time.time() > deadline and table:
            print(f"  {label(config)}: skipped, out of time")
            continue
        try:
            errors = {w: relative(part(error_batch, config, w)()[0], truths[w]) for w in truths}
            times = {(name, w): timed(part(batch, config, w)) / batch.layers for name, batch, w in shapes}
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, try the others
            print(f"  {label(config)}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        table[label(config)] = (config, errors, times)
        print(
            f"  {label(config):45s} errors {errors[None]:.1e} / {errors[WINDOW]:.1e} (full / window), "
            f"geomean {geomean(times.values()):.4f} ms",
            flush=True,
        )
    return table


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def combined(table):
    """The defaults changed by each one-change try that beat them (by geometric-mean time), all together."""
    if "defaults" not in table:
        return {}
    base = geomean(table["defaults"][2].values())
    best = {}
    for config, _, times in sorted(table.values(), key=lambda row: -geomean(row[2].values())):
        if len(config) == 1 and geomean(times.values()) < base:
            best.update(config)  # sorted slowest first: for each key, the fastest value wins
    return best


def rates(batch, window, ms):
    """TB/s of the fewest bytes the call must move (each visible key and value once, q in, out back) and TFLOP/s
    of its causal work (two products of 2 x head_dim FLOPs for each query, key seen and head)."""
    work, once = batch.keys_seen(window)
    size = torch.finfo(DTYPE).bits // 8
    moved = once * KV_HEADS * DIM * 2 * size + 2 * batch.q.numel() * size
    return moved / (ms * 1e-3) / 1e12, work * HEADS * DIM * 4 / (ms * 1e-3) / 1e12


def report(title, table, shapes):
    """Per shape: the defaults' time and the fastest configuration's, with its rates against the H100's ~3 TB/s
    and ~800 TFLOP/s; returns that configuration's label."""
    best = min(table, key=lambda name: geomean(table[name][2].values()))
    print(
        f"\n{title}: fastest by geometric mean: {best}; errors vs float32 {table[best][1][None]:.1e} (full), "
        f"{table[best][1][WINDOW]:.1e} (window {WINDOW})"
    )
    print(
        f"  {'shape':12s} {'window':>6s} {'defaults ms':>12s} {'fastest ms':>11s} {'TB/s':>6s} {'%':>4s} "
        f"{'TFLOP/s':>8s} {'%':>4s}"
    )
    for name, batch, window in shapes:
        default, fastest = table.get("defaults", table[best])[2][name, window], table[best][2][name, window]
        tbs, tflops = rates(batch, window, fastest)
        print(
            f"  {name:12s} {window!s:>6s} {default:12.4f} {fastest:11.4f} {tbs:6.2f} {tbs / 3.0:4.0%} "
            f"{tflops:8.1f} {tflops / 800:4.0%}"
        )
    return best


def tune(part, tries, cases, error_batch, deadline):
    """Measures the tries (for decode, then the one-change winners together), reports them; returns the part's
    record for the JSON and whether every error was within bounds."""
    print(f"\n{part.__name__} (errors and geometric-mean ms a layer over the shapes):", flush=True)
    table = measure(part, tries, cases, error_batch, deadline)
    together = combined(table) if part is decode else {}
    if together and label(together) not in table:
        table |= measure(part, [together], cases, error_batch, math.inf)
    best = report(part.__name__, table, cases)
    ok = all(e <= MAX_ERROR for _, errors, _ in table.values() for e in errors.values())
    return {
        "fastest": table[best][0],
        "configs": {
            name: {
                "config": config,
                "errors": {str(w): e for w, e in errors.items()},
                "ms": {f"{shape} window {w}": ms for (shape, w), ms in times.items()},
            }
            for name, (config, errors, times) in table.items()
        },
    }, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write every number here as JSON")
    parser.add_argument(
        "--budget",
        type=float,
        default=90,
        help="seconds of timing (after compiling) after which no further configuration starts",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    args = parser.parse_args()
    start = time.time()
    print(
        f"{'CPU (interpreter)' if SMOKE else torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}",
        flush=True,
    )
    if not SMOKE:
        precompile([("decode", DECODE_TRIES), ("prefill", PREFILL_TRIES)])
        print(f"compiled every configuration: {time.time() - start:.0f} s", flush=True)
    deadline = time.time() + args.budget
    ok = True
    for window in (None, WINDOW):
        error = graph_replay_error(window)
        print(f"decode replayed from a CUDA graph after new lengths and tables, window {window}: error {error:.1e}")
        ok &= error <= MAX_ERROR
    decode_errors, prefill_errors = error_batches()
    results = {}
    for part, tries, shapes, errors, share in (
        (decode, DECODE_TRIES, decode_shapes, decode_errors, 0.5),
        (prefill, PREFILL_TRIES, prefill_shapes, prefill_errors, 0.0),
    ):
        results[part.__name__], part_ok = tune(part, tries, shapes(), errors, deadline - share * args.budget)
        ok &= part_ok
        if args.out:  # after each part: what a cut-off run measured still comes back
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"\n{time.time() - start:.0f} s; " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
