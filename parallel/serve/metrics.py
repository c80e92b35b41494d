"""The server's metrics in Prometheus' text format (GET /metrics, as vLLM's and SGLang's): requests by API and
outcome, prompt and generated tokens, time to first token, inter-token latency and end-to-end latency, and each
replica's requests, KV-cache blocks, preemptions and prefix-cache hits.

Requests are counted by the HTTP edge as they end. A replica's counts come with the tokens its leader already
sends (parallel/replicas/streamer.py) and are read at scrape time: the engine loop does no work for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "gptoss:"
# vLLM's buckets for the same measures.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class Metrics:
    """`replicas()`: the requests each replica holds and its latest counts (Dispatcher.per_replica)."""

    def __init__(self, replicas: Callable[[], tuple[dict[int, int], dict[int, dict[str, int]]]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}requests",
            "Requests ended, by API and outcome: a finish reason, refused (4xx), failed "
            "(5xx) or cancelled (the client left).",
            ["api", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of the requests run.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Between a request's successive tokens.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "From a request's arrival to its end.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        r.register(_Replicas(replicas))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestClock:
    """One generating request's times and tokens, into the metrics when it ends."""

    def __init__(self, metrics: Metrics, api: str):
        self.metrics, self.api = metrics, api
        self.start = self.last = time.monotonic()
        self.prompt_tokens = self.generated = 0

    def tokens(self, n: int) -> None:
        """`n` tokens arrived together (a replica sends a step's, or server.stream_interval steps')."""
        now = time.monotonic()
        if self.generated == 0:
            self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(n):
                self.metrics.itl.observe((now - self.last) / n)
        self.generated, self.last = self.generated + n, now

    def end(self, outcome: str) -> None:
        m = self.metrics
        m.requests.labels(self.api, outcome).inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(self.generated)
        m.e2e.observe(time.monotonic() - self.start)


class _Replicas:
    """Each replica's gauges and counters, read when scraped."""

    def __init__(self, replicas):
        self.replicas = replicas

    def collect(self):
        held, stats = self.replicas()
        gauges = {
            "requests_running": "Requests a replica's engine runs.",
            "requests_waiting": "Requests a replica holds that wait for room.",
            "kv_cache_blocks_used": "KV-cache blocks holding a running request's tokens.",
            "kv_cache_blocks": "KV-cache blocks in all.",
        }
        counters = {
            "preemptions": "Requests preempted for want of KV-cache blocks (recomputed later).",
            "prefix_cache_hit_tokens": "Prompt tokens found in the prefix cache.",
            "prefix_cache_query_tokens": "Prompt tokens looked for in the prefix cache.",
        }
        held_family = GaugeMetricFamily(
            f"{PREFIX}requests_held", "Requests handed to a replica, not yet ended.", labels=["replica"]
        )
        for replica, n in held.items():
            held_family.add_metric([str(replica)], n)
        yield held_family
        for name, kind, text in [
            *((n, GaugeMetricFamily, t) for n, t in gauges.items()),
            *((n, CounterMetricFamily, t) for n, t in counters.items()),
        ]:
            family = kind(f"{PREFIX}{name}", text, labels=["replica"])
            for replica, counts in sorted(stats.items()):
                if name in counts:  # a backend's stats() names its counts as here
                    family.add_metric([str(replica)], counts[name])
            yield family
