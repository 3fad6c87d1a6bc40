"""Prometheus metrics (text format) of the server and its engine, one registry per app."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine import Engine

disable_created_metrics()  # no *_created series: they only add noise here

_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/telechat/gptDialog/v2", "/telechat/gptDialog/v4"}
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e, s = self.engine, self.engine.stats
        yield CounterMetricFamily("telechat_prompt_tokens", "Prompt tokens prefilled", value=s.prompt_tokens)
        yield CounterMetricFamily("telechat_prompt_tokens_cached", "Prompt tokens whose keys came from the prefix cache",
                                  value=s.cached_prompt_tokens)
        yield CounterMetricFamily("telechat_generation_tokens", "Tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("telechat_decode_steps", "Engine steps run (one batched forward each)", value=s.steps)
        finished = CounterMetricFamily("telechat_sequences_finished", "Sequences finished, by reason",
                                       labels=["reason"])
        for reason, n in s.requests_finished.items():
            finished.add_metric([reason], n)
        yield finished
        yield GaugeMetricFamily("telechat_queue_depth", "Sequences waiting for a slot", value=len(e.waiting))
        yield GaugeMetricFamily("telechat_running_sequences", "Sequences in the running batch", value=e.running)
        yield GaugeMetricFamily("telechat_max_concurrency", "Sequences that may run at once", value=e.max_concurrency)
        kv = e.kv_usage()
        yield GaugeMetricFamily("telechat_kv_blocks_used", f"KV blocks ({kv['block_size']} positions) held by "
                                "running sequences", value=kv["used_blocks"])
        yield GaugeMetricFamily("telechat_kv_blocks_cached", "Free KV blocks kept for prefix reuse",
                                value=kv["cached_blocks"])
        yield GaugeMetricFamily("telechat_kv_blocks_allocated", "KV blocks allocated", value=kv["allocated_blocks"])
        yield GaugeMetricFamily("telechat_generation_tokens_per_second",
                                "Generated tokens per second over the last 10 s", value=s.tokens_per_second())


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("telechat_http_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=self.registry)
        self.ttft = Histogram("telechat_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("telechat_sequence_seconds", "From arrival to the end of a sequence",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        engine.stats.on_ttft = self.ttft.observe
        engine.stats.on_finish = lambda reason, seconds: self.latency.observe(seconds)

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in _PATHS else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
