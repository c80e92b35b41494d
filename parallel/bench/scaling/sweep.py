"""A scaling sweep: what it measures (saved as sweep.json beside its results), the jobs that measure it, and the
result files, one a point.

A point is (model, variant, layout, path, concurrency):
- model: a named set of overrides on the sweep's config (`config=FILE` in the set picks another config file);
- variant: a named set of engine or model options (`model.mxfp4=require`, `engine.attention=torch`, ...);
- layout: parallel degrees, `1` for one GPU, `tp=2`, `dp=2,tp=2`; its GPU count is dp x pp x max(tp, ep);
- path: `launcher` (the batch job), `server` (launch/serve.py under streaming clients) or `plain` (the launcher with
  engine.mode=never: model.generate in batches, the plain transformers recipe; it ignores the variants);
- concurrency: requests in flight in the whole job: the server's clients; the launcher's engine.slots, or the plain
  path's generation.batch_size, times its replicas.
A job is one start of the model: a launcher or plain point, or a server measured at its concurrencies in turn.
Launcher and server points run `rounds` x concurrency requests of the workload (its first lines), plain points
one batch a replica. Each point's result is its own JSON file, written atomically once measured, so a sweep that
stops (killed, a job that failed, a Slurm task out of time) reruns only the points that have none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

PATHS = ("launcher", "server", "plain")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")  # no `_`: it joins the parts of a point's id
# What the points' figures depend on: a sweep resumed with other values here would mix incomparable points.
CONDITIONS = ("config", "overrides", "models", "variants", "workload", "rounds")


def named_sets(specs: list[str]) -> dict[str, list[str]]:
    """`--variant` / `--model` values, `NAME:key=value,key=value` (`bf16` alone has none), by name."""
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(",") if o]
        if not NAME.fullmatch(name) or name in sets:
            raise ValueError(f"{spec!r}: a name of its own (letters, digits, . + -) comes first, then :key=value,...")
        if bad := [o for o in overrides if "=" not in o]:
            raise ValueError(f"{spec!r}: {bad} is not key=value")
        sets[name] = overrides
    return sets


def degrees(layout: str) -> dict[str, int]:
    """`dp=2,tp=2` -> {"dp": 2, "tp": 2}; `1` is one GPU, no parallelism."""
    if layout == "1":
        return {}
    try:
        found = {k: int(v) for k, v in (part.split("=") for part in layout.split(","))}
        if set(found) <= {"tp", "ep", "pp", "dp"} and min(found.values()) >= 1:
            return found
    except ValueError:
        pass
    raise ValueError(f"layout {layout!r}: `1`, or degrees like tp=2 or dp=2,tp=2 (tp, ep, pp, dp)")


def gpus_of(layout: str) -> int:
    d = degrees(layout)
    return d.get("dp", 1) * d.get("pp", 1) * max(d.get("tp", 1), d.get("ep", 1))


@dataclass(frozen=True)
class Job:
    model: str
    variant: str  # "" on the plain path
    layout: str
    path: str
    concurrency: tuple[int, ...]

    @property
    def gpus(self) -> int:
        return gpus_of(self.layout)

    @property
    def name(self) -> str:
        """The job's id, of file-name characters: `20b_bf16_tp2_server`."""
        layout = "1gpu" if self.layout == "1" else self.layout.replace("=", "").replace(",", "-")
        return "_".join(p for p in (self.model, self.variant, layout, self.path) if p)

    def point(self, concurrency: int) -> str:
        """A point's id, also its result file's name."""
        return f"{self.name}_c{concurrency}"

    def per_replica(self, concurrency: int) -> int:
        return math.ceil(concurrency / degrees(self.layout).get("dp", 1))


@dataclass
class Sweep:
    config: str
    overrides: list[str]  # every job's
    models: dict[str, list[str]]
    variants: dict[str, list[str]]
    layouts: list[str]
    paths: list[str]
    concurrency: list[int]
    plain_concurrency: list[int]
    workload: dict  # write_workload's kind and sizes, and its seed
    rounds: int
    command: str = ""

    def __post_init__(self) -> None:
        """Refuse what could not run, before anything does."""
        for layout in self.layouts:
            degrees(layout)
        if min([*self.concurrency, *self.plain_concurrency, self.rounds]) < 1:
            raise ValueError("concurrencies and rounds must be >= 1")

    def jobs(self) -> list[Job]:
        """Every job, in a fixed order: a Slurm array task finds its job by its index here."""
        jobs = []
        for model in self.models:
            for layout in self.layouts:
                for path in self.paths:
                    if path == "plain":
                        jobs += [Job(model, "", layout, path, (c,)) for c in self.plain_concurrency]
                    elif path == "server":
                        jobs += [Job(model, v, layout, path, tuple(self.concurrency)) for v in self.variants]
                    else:
                        jobs += [Job(model, v, layout, path, (c,)) for v in self.variants for c in self.concurrency]
        return jobs

    def job_config(self, job: Job) -> tuple[str, list[str]]:
        """The config file and overrides of a job's launch (concurrency aside: see concurrency_overrides)."""
        config, overrides = self.config, [*self.overrides]
        for o in self.models[job.model]:
            if o.startswith("config="):
                config = o.removeprefix("config=")
            else:
                overrides.append(o)
        overrides += [f"parallel.{k}={v}" for k, v in degrees(job.layout).items()]
        return config, overrides + (["engine.mode=never"] if job.path == "plain" else self.variants[job.variant])

    def requests(self, job: Job, concurrency: int) -> int:
        return concurrency if job.path == "plain" else self.rounds * concurrency

    def workload_size(self) -> int:
        return max(self.rounds * max(self.concurrency, default=0), max(self.plain_concurrency, default=0))

    def save(self, path: Path) -> None:
        """Keep this sweep's plan in `path`; a plan there already must measure under the same conditions."""
        if path.exists():
            old = json.loads(path.read_text())
            if changed := [k for k in CONDITIONS if old.get(k) != dataclasses.asdict(self)[k]]:
                raise ValueError(
                    f"{path} holds a sweep with other {', '.join(changed)}: its points would not compare "
                    "with this sweep's; use another --out"
                )
        write_atomically(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Sweep:
        return cls(**json.loads(path.read_text()))


def concurrency_overrides(job: Job, concurrency: int) -> list[str]:
    """How a job's concurrency is set: the server's comes from its clients."""
    if job.path == "launcher":
        return [f"engine.slots={job.per_replica(concurrency)}"]
    if job.path == "plain":
        return [f"generation.batch_size={job.per_replica(concurrency)}"]
    return []


class Points:
    """The result files of a sweep's points: `<out>/points/<point>.json`."""

    def __init__(self, out: Path):
        self.dir = out / "points"
        self.dir.mkdir(parents=True, exist_ok=True)

    def missing(self, job: Job) -> list[int]:
        return [c for c in job.concurrency if not (self.dir / f"{job.point(c)}.json").exists()]

    def write(self, row: dict) -> None:
        write_atomically(self.dir / f"{row['point']}.json", json.dumps(row, indent=2) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]


def write_atomically(path: Path, text: str) -> None:
    """Whole or not at all: a task killed mid-write leaves no half a file that would count as done."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
