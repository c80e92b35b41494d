"""The sweep's plots (parallel/scaling/report.py says what they show), drawn off-screen with matplotlib.

Every curve keeps one colour and one marker per path (server o, launcher s, plain recipe X, dashed), the legend
sits below the axes so it never covers a point, and each point of the front is labelled with its concurrency.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from parallel.scaling.sweep import degrees, gpus_of

MARKERS = {"server": "o", "launcher": "s", "plain": "X"}
FAMILY_LINES = ["-", "-.", (0, (5, 1)), (0, (1, 1))]


def style(path: str, colour: str) -> dict:
    return {"color": colour, "marker": MARKERS[path], "linestyle": "--" if path == "plain" else "-", "markersize": 6}


def front(curves: dict[tuple, list[dict]], name, title: str, out: Path) -> Path:
    """Output tok/s per GPU against tok/s per user and against TTFT p50, a curve a (model, path, variant, layout)."""
    fig, (by_user, by_ttft) = plt.subplots(1, 2, figsize=(12, 6), sharey=True, layout="constrained")
    for i, (key, rows) in enumerate(curves.items()):
        look = style(key[1], f"C{i % 10}")
        for ax, field in ((by_user, "tokens_per_s_per_user"), (by_ttft, "ttft_p50_s")):
            shown = [r for r in rows if r[field] is not None]
            xs, ys = [r[field] for r in shown], [r["output_tokens_per_s_per_gpu"] for r in shown]
            ax.plot(xs, ys, label=name(key), **look)
            for r, x, y in zip(shown, xs, ys):
                ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=look["color"])
    by_user.set(xlabel="tok/s per user (output tokens/s each request gets)", ylabel="output tok/s per GPU")
    by_ttft.set(xlabel="time to first token, median (s)")
    by_user.set_title("throughput against interactivity (better: up and right)", fontsize=9)
    by_ttft.set_title("throughput against responsiveness (better: up and left)", fontsize=9)
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
    for i, (config, best) in enumerate(configs.items()):
        colour, label = f"C{i % 10}", name((*config, None))
        families = sorted({family(layout) for layout in best} - {""})
        for j, fam in enumerate(families):
            line = sorted((gpus_of(layout), v, layout) for layout, v in best.items() if family(layout) in ("", fam))
            layouts = " / ".join(layout for _, _, layout in line if layout != "1")
            ax.plot([g for g, _, _ in line], [v for _, v, _ in line], label=f"{label} · {layouts}",
                    **{**style(config[1], colour), "linestyle": FAMILY_LINES[j % len(FAMILY_LINES)]})
        if "1" in best and families:
            ax.axhline(best["1"], color=colour, linestyle=":", linewidth=1.2, label=f"{label} · ideal linear scaling (its 1-GPU tok/s per GPU)")
    counts = sorted({gpus_of(layout) for _, _, _, layout in curves})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set(xlabel="GPUs", ylabel="output tok/s per GPU (best over the concurrencies swept)", ylim=(0, None))
    finish(fig, [ax], title, "configuration · layouts (a line from 1 GPU)")
    return save(fig, out)


def scale(ax, name: str, values: list[float]) -> None:
    """Axis `name` ("x", "y") logarithmic where the values span more than a decade (the plain recipe beside the
    engine, 1 to 256 clients), with plain numbers on its ticks; else linear from zero."""
    if values and max(values) > 10 * min(values):
        getattr(ax, f"set_{name}scale")("log")
        getattr(ax, f"{name}axis").set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    elif values:
        getattr(ax, f"set_{name}lim")(0, max(values) * 1.15)


def family(layout: str) -> str:
    """`tp=2` and `tp=4` are one line, `tp`; the one-GPU layout, "", starts every line."""
    return "×".join(sorted(degrees(layout)))


def finish(fig, axes: list, title: str, legend_title: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2 if len(labels) <= 8 else 3, fontsize=8,
               title=legend_title, title_fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)


def save(fig, out: Path) -> Path:
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
