"""Throughput scaling study: the launcher over a grid of layouts and batch sizes, on random weights.

    python launch/scaling.py --config configs/gpt-oss-20b.yaml --gpus 2 --layouts 1 tp=2 dp=2 ep=2 \
        --batch-sizes 1 32 --new-tokens 128 --out docs/scaling/h100-20b model.path=builtin:gpt-oss-20b

Every point is a real job: `torchrun launch/generate.py` with model.load_format=dummy on synthetic prompts
(harmony-rendered, ~70 tokens). Beside them, in this process on one device, the plain transformers recipe
(`model.generate` on the same random model and prompts) gives the baseline of the same run. Writes
results.json, results.csv, throughput.png and efficiency.png under --out. Layouts that need more GPUs than
--gpus are skipped. On a CPU machine the same runs on gloo (use the tiny model there).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parallel.config import parse_args_and_overrides

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a long story about topic number {}."
FIELDS = ["layout", "gpus", "batch_size", "requests", "generated_tokens", "tokens_per_s", "tokens_per_s_per_gpu",
          "efficiency", "time_to_first_token_s", "peak_gpu_memory_gib"]


def degrees(layout: str) -> dict[str, int]:
    """`tp=2,ep=2` -> {"tp": 2, "ep": 2}; `1` is one GPU, no parallelism."""
    return {} if layout == "1" else {k: int(v) for k, v in (part.split("=") for part in layout.split(","))}


def gpus_for(d: dict[str, int]) -> int:
    return d.get("dp", 1) * d.get("pp", 1) * max(d.get("tp", 1), d.get("ep", 1))


def write_prompts(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"id": i, "prompt": PROMPT.format(i)}) + "\n" for i in range(n)))


def run_point(args, layout: str, batch: int, workdir: Path) -> dict:
    d = degrees(layout)
    gpus = gpus_for(d)
    requests = batch * d.get("dp", 1) * args.batches
    prompts, out = workdir / f"{layout}-{batch}.jsonl", workdir / f"{layout}-{batch}.out.jsonl"
    write_prompts(prompts, requests)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", str(ROOT / "launch" / "generate.py"),
           "--config", args.config, f"data.input={prompts}", f"data.output={out}", "model.load_format=dummy",
           f"generation.batch_size={batch}", f"generation.max_new_tokens={args.new_tokens}", "runtime.progress=false",
           "output.echo=false", *(f"parallel.{k}={v}" for k, v in d.items()), *args.overrides]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{layout} batch {batch} failed:\n{run.stderr[-3000:]}")
    m = json.loads(Path(f"{out}.metrics.json").read_text())
    return {"layout": layout, "gpus": gpus, "batch_size": batch, "requests": m["requests"],
            "generated_tokens": m["generated_tokens"], "tokens_per_s": m["tokens_per_s"],
            "tokens_per_s_per_gpu": m["tokens_per_s_per_gpu"], "time_to_first_token_s": m["time_to_first_token_s"],
            "peak_gpu_memory_gib": m["peak_gpu_memory_gib"]}


def plain_recipe(args) -> list[dict]:
    """The cookbook recipe on the same random model and prompts: one process, model.generate, eager attention."""
    import torch
    from transformers import GptOssForCausalLM
    from transformers.utils import logging as transformers_logging

    from parallel.config import merge_config
    from parallel.distributed.checkpoint import read_model_config, resolve_checkpoint
    from parallel.protocol.harmony import encoding

    cfg = merge_config(args.config, args.overrides)
    config = read_model_config(resolve_checkpoint(cfg.model.path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    transformers_logging.set_verbosity_error()  # its load report lists every random weight as missing
    model = GptOssForCausalLM.from_pretrained(None, config=config, state_dict={}, dtype=dtype, device_map=device,
                                              attn_implementation="eager").eval()
    enc = encoding()
    rows = [_time_plain(model, enc, device, batch, args.new_tokens) for batch in args.batch_sizes]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _time_plain(model, enc, device, batch: int, new_tokens: int) -> dict:
    import torch

    from parallel.engine.plain import left_pad
    from parallel.protocol.harmony import pad_token_id, render_prompt
    from parallel.protocol.requests import parse_line

    prompts = [render_prompt(enc, parse_line(json.dumps({"prompt": PROMPT.format(i)}), i + 1), "medium") for i in range(batch)]
    pad = pad_token_id(enc)
    ids, mask = left_pad(prompts, pad, device)
    width = ids.shape[1]
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - width) * batch
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"layout": "plain transformers", "gpus": 1, "batch_size": batch, "requests": batch, "generated_tokens": generated,
            "tokens_per_s": round(generated / seconds, 2), "tokens_per_s_per_gpu": round(generated / seconds, 2),
            "time_to_first_token_s": None, "peak_gpu_memory_gib": peak}


def add_efficiency(rows: list[dict]) -> None:
    """Tokens/s per GPU over the one-GPU launcher run at the same batch size per replica."""
    base = {r["batch_size"]: r["tokens_per_s_per_gpu"] for r in rows if r["layout"] == "1"}
    for r in rows:
        b = base.get(r["batch_size"])
        r["efficiency"] = round(r["tokens_per_s_per_gpu"] / b, 3) if b and r["layout"] != "plain transformers" else None


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, name, ylabel in (("tokens_per_s", "throughput", "generated tokens/s"), ("efficiency", "efficiency", "tokens/s per GPU vs 1 GPU")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for batch in sorted({r["batch_size"] for r in rows}):
            points = [r for r in rows if r["batch_size"] == batch and r[key] is not None]
            for family in sorted({family_of(r["layout"]) for r in points} - {"1 GPU", "plain transformers"}):
                series = sorted((r for r in points if family_of(r["layout"]) in (family, "1 GPU")), key=lambda r: r["gpus"])
                ax.plot([r["gpus"] for r in series], [r[key] for r in series], marker="o", label=f"{family}, batch {batch}")
            for r in points:
                if r["layout"] == "plain transformers":
                    ax.scatter([1], [r[key]], marker="x", color="black", zorder=3)
                    ax.annotate(f"plain, batch {batch}", (1, r[key]), fontsize=7)
        ax.set_xlabel("GPUs")
        ax.set_xticks(sorted({r["gpus"] for r in rows}))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name} (random weights)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def family_of(layout: str) -> str:
    """`tp=2` and `tp=4` are one line on the plots: the layout without its numbers."""
    if layout in ("1", "plain transformers"):
        return "1 GPU" if layout == "1" else layout
    return "+".join(part.split("=")[0] for part in layout.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True, help="the most processes a point may use")
    parser.add_argument("--layouts", nargs="+", default=["1", "tp=2", "dp=2", "ep=2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2, help="batches per replica at each point")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain transformers baseline")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="launcher key=value overrides, e.g. model.path=builtin:gpt-oss-20b")
    args = parse_args_and_overrides(parser, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = [] if args.no_plain else plain_recipe(args)
    with tempfile.TemporaryDirectory() as work:
        for layout in args.layouts:
            if gpus_for(degrees(layout)) > args.gpus:
                print(f"scaling: {layout} needs {gpus_for(degrees(layout))} GPUs, skipped", file=sys.stderr)
                continue
            for batch in args.batch_sizes:
                rows.append(run_point(args, layout, batch, Path(work)))
                print(f"scaling: {json.dumps(rows[-1])}", file=sys.stderr)
    add_efficiency(rows)
    meta = {"config": args.config, "overrides": args.overrides, "new_tokens": args.new_tokens,
            "command": " ".join(["python", "launch/scaling.py", *(argv if argv is not None else sys.argv[1:])]),
            "weights": "random (model.load_format=dummy)"}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out)
    print(f"scaling: {len(rows)} points in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
