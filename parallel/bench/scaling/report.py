"""A sweep's report, drawn from whatever points have results (a sweep still running, or one with failed jobs,
reports what it has and names what it lacks):
- results.csv and results.json: one row a point;
- summary.md: each curve's best point, and its scaling efficiency against one GPU;
- front.png: output tok/s per GPU against tok/s per user (left) and against the median time to first token (right),
  one curve a layout, variant and path, its points the concurrencies swept: the throughput-latency front;
- scaling.png, where the sweep has more than one GPU count: each configuration's best tok/s per GPU against its
  GPUs, a line a layout family (tp, dp, ...), with ideal linear scaling (the one-GPU figure at every count) dotted.
A curve is (model, path, variant, layout); labels name only what differs between the sweep's curves.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from parallel.bench.scaling import plots
from parallel.bench.scaling.sweep import Points, Sweep, gpus_of

FIELDS = [
    "point",
    "model",
    "variant",
    "layout",
    "path",
    "concurrency",
    "gpus",
    "nodes",
    "requests",
    "output_tokens",
    "seconds",
    "output_tokens_per_s",
    "output_tokens_per_s_per_gpu",
    "tokens_per_s_per_user",
    "ttft_p50_s",
    "ttft_p99_s",
    "itl_p50_s",
    "itl_p99_s",
    "peak_gpu_memory_gib",
    "machine",
    "measured",
]
NOTE = (
    "Concurrency: requests in flight (the server's clients; the launcher's slots, the plain recipe's batch, "
    "times the replicas). Launcher and plain: tok/s per user is the job's tok/s over its requests in flight."
)
HEADER = (
    "| curve | GPUs | best output tok/s per GPU | at concurrency | tok/s per user there | TTFT p50 there (s) "
    "| scaling efficiency |"
)
WORKLOADS = {"sharegpt": "ShareGPT-like lengths", "long": "long prompts", "fixed": "fixed lengths"}


def write_report(out: Path) -> list[Path]:
    """Every file of the report, written under `out`; the paths written."""
    sweep = Sweep.load(out / "sweep.json")
    rows = sorted(Points(out).rows(), key=lambda r: (*curve_of(r), r["concurrency"]))
    (out / "results.json").write_text(json.dumps({"sweep": sweep.__dict__, "points": rows}, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    curves = group(rows)
    title = heading(sweep, rows, json.loads((out / "workload.json").read_text()))
    names = namer(list(curves))
    written = [out / "results.json", out / "results.csv", out / "summary.md"]
    (out / "summary.md").write_text(summary(sweep, curves, names, title, missing(sweep, rows)))
    if rows:
        written.append(plots.front(curves, names, title, out / "front.png"))
    if len({r["gpus"] for r in rows}) > 1:
        written.append(plots.scaling(curves, names, title, out / "scaling.png"))
    return written


def curve_of(row: dict) -> tuple[str, str, str, str]:
    return row["model"], row["path"], row["variant"], row["layout"]


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by curve, each curve's by concurrency."""
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        curves.setdefault(curve_of(r), []).append(r)
    return curves


def namer(keys: list[tuple]):
    """Labels that say what differs between the curves: `tp=2 (2 GPUs) · server · mxfp4`, `1 GPU · plain
    transformers`; the model only when the sweep has several."""
    models = {k[0] for k in keys}
    variants = {k[2] for k in keys if k[1] != "plain"}

    def name(key: tuple) -> str:
        """A curve's label; a configuration's (no layout) where key's layout is None."""
        model, path, variant, layout = key
        parts = [] if layout is None else ["1 GPU" if layout == "1" else f"{layout} ({gpus_of(layout)} GPUs)"]
        parts += ["plain transformers"] if path == "plain" else [path, *([variant] if len(variants) > 1 else [])]
        return " · ".join([model, *parts] if len(models) > 1 else parts)

    return name


def heading(sweep: Sweep, rows: list[dict], workload: dict) -> str:
    """The plots' title: models and weights, workload, machine."""
    dummy = all("model.load_format=dummy" in [*sweep.overrides, *o] for o in sweep.models.values())
    machines = sorted({r["machine"] for r in rows}) or ["(no point measured yet)"]
    nodes = max((r["nodes"] for r in rows), default=1)
    lengths = f"{workload['mean_prompt_tokens']:g} prompt + {workload['mean_new_tokens']:g} output tokens " + (
        "a request" if workload["kind"] == "fixed" else "on average"
    )
    return (
        f"{', '.join(sweep.models)}{' (random weights)' if dummy else ''}, "
        f"{WORKLOADS[workload['kind']]}: {lengths}\non {', '.join(machines)}"
        + (f", up to {nodes} nodes" if nodes > 1 else "")
    )


def missing(sweep: Sweep, rows: list[dict]) -> list[str]:
    measured = {r["point"] for r in rows}
    return [job.point(c) for job in sweep.jobs() for c in job.concurrency if job.point(c) not in measured]


def summary(sweep: Sweep, curves: dict[tuple, list[dict]], name, title: str, lacking: list[str]) -> str:
    """summary.md: the best point of each curve (most output tok/s per GPU) and its scaling efficiency: that figure
    over the one-GPU curve's of the same model, path and variant."""
    best = {key: max(rows, key=lambda r: r["output_tokens_per_s_per_gpu"]) for key, rows in curves.items()}
    lines = [
        f"# Scaling sweep: {title.replace(chr(10), ' ')}",
        "",
        f"    {sweep.command}",
        "",
        NOTE,
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in best.items():
        one = best.get((*key[:3], "1"))
        efficiency = f"{r['output_tokens_per_s_per_gpu'] / one['output_tokens_per_s_per_gpu']:.2f}" if one else "-"
        lines.append(
            f"| {name(key)} | {r['gpus']} | {r['output_tokens_per_s_per_gpu']:,.1f} | {r['concurrency']} | "
            f"{r['tokens_per_s_per_user']:,.1f} | {r['ttft_p50_s'] if r['ttft_p50_s'] is not None else '-'} | "
            f"{efficiency} |"
        )
    if lacking:
        lines += [
            "",
            f"Not measured ({len(lacking)} points; rerun the sweep to measure only these): {', '.join(lacking)}",
        ]
    return "\n".join(lines) + "\n"
