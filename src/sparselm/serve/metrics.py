"""Prometheus metrics of the server (``GET /metrics``), all named ``sparselm_*``.

Engine state (requests running and waiting, KV blocks, prefix-cache hits, preemptions, tokens in and out, per-layer
expert load, where the step time goes) is the engine's snapshot after its latest step; latencies are observed as each
sequence finishes, from the times the engine recorded.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sparselm.serve.engine import EngineSnapshot
from sparselm.serve.sequence import SequenceRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 20, 60, 120)


class EngineCollector:
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        s = self.snapshot()
        if s is None:
            return

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"sparselm_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"sparselm_{name}", doc, value=value)

        yield gauge("num_requests_running", "Sequences in the running batch", s.running)
        yield gauge("num_requests_waiting", "Sequences queued (not yet running, or preempted)", s.waiting)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks held by sequences", s.kv_used)
        yield gauge("kv_cache_blocks_free", "KV-cache blocks free (cached prefixes included)", s.kv_free)
        yield gauge("kv_cache_usage_ratio", "Fraction of KV-cache blocks held by sequences", s.kv_used / s.kv_blocks)
        yield gauge("kv_cache_blocks_cached", "Free or used blocks holding a reusable prefix", s.kv_cached)
        yield counter("prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache", s.prefix_queries)
        yield counter("prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache", s.prefix_hits)
        yield counter("num_preemptions", "Sequences preempted (blocks freed, recomputed later)", s.preemptions)
        yield counter("prompt_tokens", "Prompt tokens of requests that produced a first token", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated", s.generation_tokens)
        yield counter("engine_steps", "Scheduler steps (one forward each)", s.steps)
        finished = CounterMetricFamily("sparselm_request_finished", "Sequences finished, by reason", labels=["reason"])
        for reason, count in s.finished.items():
            finished.add_metric([reason], count)
        yield finished
        seconds = CounterMetricFamily(
            "sparselm_engine_seconds", "Engine wall time, by phase of the step", labels=["phase"]
        )
        for phase, value in s.seconds.items():
            seconds.add_metric([phase], value)
        yield seconds
        if s.moe_layers:
            load = CounterMetricFamily(
                "sparselm_expert_tokens",
                "Token assignments routed to each expert, per MoE layer",
                labels=["layer", "expert"],
            )
            for layer, row in zip(s.moe_layers, s.expert_load, strict=True):
                for expert, count in enumerate(row):
                    load.add_metric([str(layer), str(expert)], count)
            yield load


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "sparselm_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "sparselm_inter_token_latency_seconds", "Between consecutive tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "sparselm_e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=r
        )
        self.http = Counter(
            "sparselm_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        r.register(EngineCollector(snapshot))

    def finished(self, seq: SequenceRecord, now: float) -> None:
        if seq.first_token_time is not None:
            self.ttft.observe(seq.first_token_time - seq.arrival)
        times = seq.token_times
        for a, b in zip(times, times[1:], strict=False):
            self.itl.observe(b - a)
        self.e2e.observe(now - seq.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
