"""The sweep's plots (parallel/bench/scaling/report.py says what they show), drawn off-screen with matplotlib.

A configuration (model, path, variant) keeps one colour on both plots, a layout (or layout family) one line style,
a path one marker (server o, launcher s, plain recipe X). The legend sits below the axes so it never covers a
point; the front's left panel labels each point with its concurrency (the right one has the same points, in the
same order along each curve, where the labels would crowd: time to first token grows with concurrency).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from parallel.bench.scaling.sweep import degrees, gpus_of

MARKERS = {"server": "o", "launcher": "s", "plain": "X"}
LINES = ["-", "--", "-.", (0, (1, 1)), (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def colours(keys) -> dict[tuple, str]:
    """A colour per configuration, (model, path, variant), the first three of a curve's key."""
    configs = list(dict.fromkeys(k[:3] for k in keys))
    return {config: f"C{i % 10}" for i, config in enumerate(configs)}


def looks(keys: list[tuple]) -> dict[tuple, dict]:
    """Each curve's look: its configuration's colour, its layout's line (one GPU solid), its path's marker."""
    colour = colours(keys)
    layouts = sorted({k[3] for k in keys}, key=lambda layout: (gpus_of(layout), layout))
    return {
        k: {
            "color": colour[k[:3]],
            "linestyle": LINES[layouts.index(k[3]) % len(LINES)],
            "marker": MARKERS[k[1]],
            "markersize": 6,
        }
        for k in keys
    }


def front(curves: dict[tuple, list[dict]], name, title: str, out: Path) -> Path:
    """Output tok/s per GPU against tok/s per user and against TTFT p50, a curve a (model, path, variant, layout)."""
    fig, (by_user, by_ttft) = plt.subplots(1, 2, figsize=(12, 6), sharey=True, layout="constrained")
    look = looks(list(curves))
    for key, rows in curves.items():
        for ax, field in ((by_user, "tokens_per_s_per_user"), (by_ttft, "ttft_p50_s")):
            shown = [r for r in rows if r[field] is not None]
            ax.plot(
                [r[field] for r in shown],
                [r["output_tokens_per_s_per_gpu"] for r in shown],
                label=name(key),
                **look[key],
            )
        for r in rows:
            by_user.annotate(
                str(r["concurrency"]),
                (r["tokens_per_s_per_user"], r["output_tokens_per_s_per_gpu"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color=look[key]["color"],
            )
    by_user.set(xlabel="tok/s per user (output tokens/s each request gets)", ylabel="output tok/s per GPU")
    by_ttft.set(xlabel="time to first token, median (s)")
    by_user.set_title("throughput against interactivity (better: up and right)", fontsize=9)
    by_ttft.set_title("throughput against responsiveness (better: up and left; the same points)", fontsize=9)
    rows = [r for points in curves.values() for r in points]
    scale(by_user, "x", [r["tokens_per_s_per_user"] for r in rows])
    scale(by_ttft, "x", [r["ttft_p50_s"] for r in rows if r["ttft_p50_s"] is not None])
    scale(by_user, "y", [r["output_tokens_per_s_per_gpu"] for r in rows])
    finish(fig, [by_user, by_ttft], title, "curves (point labels: concurrency, requests in flight)")
    return save(fig, out)


def scaling(curves: dict[tuple, list[dict]], name, title: str, out: Path) -> Path:
    """Each configuration's best tok/s per GPU against GPU count, a line a layout family through the one-GPU
    point, and that point's figure dotted across as ideal linear scaling."""
    configs: dict[tuple, dict[str, float]] = {}
    for (model, path, variant, layout), rows in curves.items():
        configs.setdefault((model, path, variant), {})[layout] = max(r["output_tokens_per_s_per_gpu"] for r in rows)
    fig, ax = plt.subplots(figsize=(9, 6), layout="constrained")
    colour = colours(list(curves))
    families = sorted({family(layout) for layout in {k[3] for k in curves}} - {""})
    for config, best in configs.items():
        label = name((*config, None))
        for fam in sorted({family(layout) for layout in best} - {""}):
            line = sorted((gpus_of(layout), v, layout) for layout, v in best.items() if family(layout) in ("", fam))
            layouts = " / ".join(layout for _, _, layout in line if layout != "1")
            ax.plot(
                [g for g, _, _ in line],
                [v for _, v, _ in line],
                label=f"{label} · {layouts}",
                color=colour[config],
                marker=MARKERS[config[1]],
                linestyle=LINES[families.index(fam) % len(LINES)],
                markersize=6,
            )
        if "1" in best and len(best) > 1:
            ax.axhline(best["1"], color=colour[config], linestyle=":", linewidth=1.2, label=f"{label} · ideal")
    counts = sorted({gpus_of(layout) for _, _, _, layout in curves})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set(xlabel="GPUs", ylabel="output tok/s per GPU (best over the concurrencies swept)")
    scale(ax, "y", [v for best in configs.values() for v in best.values()])
    finish(
        fig, [ax], title, "configuration · layouts (a line from 1 GPU); ideal: linear scaling, the 1-GPU tok/s per GPU"
    )
    return save(fig, out)


def scale(ax, name: str, values: list[float]) -> None:
    """Axis `name` ("x", "y") logarithmic where the values span more than a decade (the plain recipe beside the
    engine, 1 to 256 clients), with plain numbers on its ticks; else linear from zero."""
    if values and max(values) > 10 * min(values):
        getattr(ax, f"set_{name}scale")("log")
        axis = getattr(ax, f"{name}axis")
        axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    elif values:
        getattr(ax, f"set_{name}lim")(0, max(values) * 1.15)


def family(layout: str) -> str:
    """`tp=2` and `tp=4` are one line, `tp`; the one-GPU layout, "", starts every line."""
    return "×".join(sorted(degrees(layout)))


def finish(fig, axes: list, title: str, legend_title: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=2 if len(labels) <= 8 else 3,
        fontsize=8,
        title=legend_title,
        title_fontsize=8,
        frameon=False,
    )
    fig.suptitle(title, fontsize=10)


def save(fig, out: Path) -> Path:
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
