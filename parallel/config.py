"""The job's configuration: typed defaults, then a YAML file, then `key=value` overrides, merged once.

The dataclasses below are the schema. Merging happens in struct mode, so a misspelled key, a value of the
wrong type or one outside its Enum fails with omegaconf's message, which names the key (and the allowed
values); then every number with a range is checked (RULES), naming its key too.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class Choice(str, Enum):
    """A value from a fixed set, which omegaconf checks by member name. A member is named as its value and is a
    str that prints as that value, so that it compares (`mode == "auto"`), formats, goes to torch
    (`getattr(torch, dtype)`) and back to YAML as the plain string."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


def _choice(name: str, *values: str) -> type[Choice]:
    return Choice(name, [(value, value) for value in values], module=__name__, qualname=name)


DType = _choice("DType", "auto", "bfloat16", "float32")
LoadFormat = _choice("LoadFormat", "auto", "dummy")
Mxfp4Mode = _choice("Mxfp4Mode", "auto", "require", "dequantize")
Effort = _choice("Effort", "low", "medium", "high")
EngineMode = _choice("EngineMode", "auto", "always", "never")
AttentionChoice = _choice("AttentionChoice", "auto", "triton", "torch")
KvCacheDtype = _choice("KvCacheDtype", "auto", "fp8")


@dataclass
class ModelConfig:
    # A hub id, a local checkpoint folder, or `builtin:tiny` (built and cached on first use).
    path: str = MISSING
    # `auto`: the checkpoint's.
    dtype: DType = DType.auto
    # `auto` picks the fastest attention with sinks that can be had here, else eager; or a transformers name.
    attn_implementation: str = "auto"
    # `dummy`: random weights of the model's shape built in place, no checkpoint read (for benchmarks).
    load_format: LoadFormat = LoadFormat.auto
    # MXFP4 checkpoints: `auto` keeps the experts packed where the engine generates and triton_kernels runs, else
    # dequantizes them to bf16 (with a warning naming what is missing); on the plain path it is transformers'
    # choice; `require` fails instead of dequantizing; `dequantize` always does (parallel/loading/quantization.py).
    mxfp4: Mxfp4Mode = Mxfp4Mode.auto


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    # -1: whatever the world size leaves after the model-parallel degrees.
    dp: int = -1


@dataclass
class DataConfig:
    input: str | None = None  # JSONL in and out: required by launch/generate.py, unused by launch/serve.py
    output: str | None = None
    # This job runs input lines whose (line number - 1) % num_shards == shard (Slurm job arrays).
    shard: int = 0
    num_shards: int = 1


@dataclass
class GenerationConfig:
    max_new_tokens: int = 1024
    # 0 means greedy decoding.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    reasoning_effort: Effort = Effort.medium
    # Harmony's system message carries a date only when one is given (YYYY-MM-DD).
    conversation_date: str | None = None


@dataclass
class OutputConfig:
    # Also write each completion decoded with its harmony special tokens.
    raw: bool = False
    # Print every record on rank 0 as it is written.
    echo: bool = False


@dataclass
class RuntimeConfig:
    # A rank that sends no heartbeat for this long is declared dead and the job ends, naming it.
    heartbeat_timeout_s: float = 120.0
    # Upper bound for any collective (NCCL/gloo): a stuck peer turns into an error, never a hang.
    collective_timeout_s: float = 1800.0
    progress: bool = True


@dataclass
class EngineConfig:
    # `auto`: the fast engine (parallel/engine/) on GPU for every layout but pipelines, else the plain
    # `model.generate` path; `always` also on CPU (exact there, not fast); `never`: always the plain path.
    mode: EngineMode = EngineMode.auto
    # Requests a replica runs at a time (the engine); more wait for a finished one's place. Large, like vLLM's
    # max_num_seqs: a batch job's requests then all start early, so its long ones do not end it at a small batch.
    slots: int = 1024
    cuda_graphs: bool = True
    # torch.compile the decode step's pieces inside the graphs (GPU): fewer, fused kernels a step.
    compile: bool = True
    # Decode attention: `auto` is our Triton kernel on GPU (reads only live keys) where triton is installed,
    # else torch; `torch` reads every cached position (the reference).
    attention: AttentionChoice = AttentionChoice.auto
    # GiB for the paged KV cache; None: the GPU's free memory after loading, less some headroom (1 GiB on CPU).
    cache_gib: float | None = None
    # The KV cache's element type: `auto` is the model's (bf16); `fp8` (e4m3, unscaled, as vLLM's
    # --kv-cache-dtype fp8 without scales) holds twice the tokens in the same memory, keys and values rounded to
    # 3 mantissa bits (docs/engine.md says what that costs).
    kv_cache_dtype: KvCacheDtype = KvCacheDtype.auto
    # Tokens one step computes at most: the running requests' next tokens first, then chunks of waiting prompts.
    max_batched_tokens: int = 8192
    # Tokens a KV-cache block holds: requests are admitted, and prefixes shared, by blocks.
    block_size: int = 16
    # Full blocks of a prompt are kept, keyed by their tokens, for later prompts that start the same way (every
    # harmony prompt shares its system header; chat clients resend their whole history each turn).
    prefix_caching: bool = True


@dataclass
class ServerConfig:
    # Loopback by default: exposing the model to a network is a decision to make on purpose.
    host: str = "127.0.0.1"
    port: int = 8000
    # Clients must send `Authorization: Bearer <key>`; also read from GPT_OSS_API_KEY. None: no key needed.
    api_key: str | None = None
    # The model id /v1/models lists and requests must name; None: model.path.
    model_name: str | None = None
    # After SIGTERM, in-flight requests get this long to finish (torchrun kills its workers 30 s after a TERM).
    drain_timeout_s: float = 20.0
    # Steps of tokens a replica gathers before sending them to rank 0 (a request's first and last tokens go at
    # once): larger costs streaming smoothness, saves rank 0 work at high concurrency.
    stream_interval: int = 1
    # A request body larger than this is refused with 413 before it is read (a Content-Length over it), or cut
    # off where it passes it (a chunked body). A context-filling prompt is well under 1 MB of JSON.
    max_body_bytes: int = 4 * 2**20
    # A request's head and body must arrive within this long of the connection opening or its last reply ending: a
    # client that trickles them (slowloris) is disconnected instead of holding a connection forever.
    request_timeout_s: float = 30.0


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


class ConfigError(ValueError):
    pass


def load_config(argv: list[str] | None = None, required: tuple[str, ...] = ()) -> JobConfig:
    """`--config FILE` then `key=value` overrides, on top of the typed defaults; `required` keys must be set."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tp=2")
    args = parse_args_and_overrides(parser, argv)
    return merge_config(args.config, args.overrides, required)


# A `key=value` override names a key inside a section (model.path=...): other words with `=` (a scaling
# study's layouts, tp=2) are arguments.
OVERRIDE = re.compile(r"^\w+(\.\w+)+=")


def parse_args_and_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser's arguments, with every `section.key=value` word anywhere in argv as `overrides` (after any other
    words the parser's own `overrides` took, which merge_config then refuses by name): an option that takes a
    list (`--batch-sizes 1 128 model.path=...`) would otherwise swallow the overrides after it."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = [*getattr(args, "overrides", []), *overrides]
    return args


def merge_config(path: str | Path, overrides: list[str] = (), required: tuple[str, ...] = ()) -> JobConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    if not Path(path).is_file():
        raise ConfigError(f"config {path}: no such file")
    cfg = OmegaConf.structured(JobConfig)
    OmegaConf.set_struct(cfg, True)
    # The file and the overrides are merged one at a time, so that an error says which of them holds the bad key.
    cfg = _merged(f"config {path}", lambda: OmegaConf.merge(cfg, OmegaConf.load(path)))
    cfg = _merged("overrides", lambda: OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))))
    job: JobConfig = _merged(f"config {path}", lambda: OmegaConf.to_object(cfg))
    _check_values(job)
    missing = [key for key in required if OmegaConf.select(OmegaConf.structured(job), key) is None]
    if missing:
        raise ConfigError(f"config {path}: missing {', '.join(missing)} (add {missing[0]}=...)")
    return job


def _merged(source: str, merge: Callable[[], Any]) -> Any:
    try:
        return merge()
    except OmegaConfBaseException as e:
        # omegaconf's message names the key (`full_key: ...`); its object-type lines only add noise.
        lines = [
            ln.strip() for ln in str(e).splitlines() if not ln.strip().startswith(("reference_type", "object_type"))
        ]
        raise ConfigError(f"{source}: {' '.join(lines)}") from None


# A check that NaN fails too, and what it asks for.
Rule = tuple[Callable[[Any], bool], str]
# Timeouts become a timedelta and c10d's milliseconds, which inf or 1e300 overflow: 1e9 s is 31 years.
MAX_TIMEOUT_S = 1e9
AT_LEAST_ONE: Rule = (lambda v: v >= 1), ">= 1"
TIMEOUT: Rule = (lambda v: 0 < v <= MAX_TIMEOUT_S), f"in (0, {MAX_TIMEOUT_S:g}] seconds"


def _is_date(value: str | None) -> bool:
    if value is None:
        return True
    try:  # the form first: fromisoformat also takes 20250628 and 2025-W26-6
        return re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is not None and bool(datetime.date.fromisoformat(value))
    except ValueError:
        return False


# Every value with a range or a form: a bad one fails at once naming its key, not later with a message of its own.
RULES: dict[str, Rule] = {
    "generation.max_new_tokens": AT_LEAST_ONE,
    "generation.batch_size": AT_LEAST_ONE,
    "generation.temperature": ((lambda v: v >= 0), ">= 0"),
    "generation.top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    # Batch k samples with seed + k, and torch takes seeds below 2**64.
    "generation.seed": ((lambda v: abs(v) < 2**63), "in (-2**63, 2**63)"),
    # Rendered into every prompt's system message as it is written.
    "generation.conversation_date": (_is_date, "a date YYYY-MM-DD, or null"),
    "engine.slots": AT_LEAST_ONE,
    "engine.block_size": ((lambda v: v >= 1 and not v & (v - 1)), "a power of two"),
    "engine.cache_gib": ((lambda v: v is None or 0 < v < float("inf")), "> 0, or null (the free GPU memory)"),
    "server.port": ((lambda v: 0 < v < 65536), "a TCP port (1 to 65535)"),
    "server.stream_interval": AT_LEAST_ONE,
    "server.drain_timeout_s": ((lambda v: 0 <= v <= MAX_TIMEOUT_S), f"in [0, {MAX_TIMEOUT_S:g}] seconds"),
    "server.max_body_bytes": AT_LEAST_ONE,
    "server.request_timeout_s": TIMEOUT,
    "runtime.heartbeat_timeout_s": TIMEOUT,
    "runtime.collective_timeout_s": TIMEOUT,
}


def _check_values(job: JobConfig) -> None:
    values = {key: attrgetter(key)(job) for key in RULES}
    problems = [f"{key}={values[key]!r} must be {rule}" for key, (ok, rule) in RULES.items() if not ok(values[key])]
    if not 0 <= job.data.shard < job.data.num_shards:
        problems.append(f"data.shard={job.data.shard} must be in [0, data.num_shards={job.data.num_shards})")
    if job.engine.max_batched_tokens < job.engine.slots:
        problems.append(
            f"engine.max_batched_tokens={job.engine.max_batched_tokens} must be >= engine.slots={job.engine.slots} "
            "(every running request's next token fits a step)"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def to_yaml(job: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))
