"""Prometheus metrics for calls: sessions, responses, errors and per-turn stage latencies.

prometheus-client is the reference implementation of the exposition format. Each app gets
its own `CollectorRegistry` (not the global default) so several servers in one process (the
tests) keep separate numbers and never collide on registration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

# seconds; dense around the 0.2-1 s that separates a natural reply from an awkward one
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
STAGES = ("vad_end_to_first_audio", "prefill", "first_text", "first_codec", "first_audio", "total")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions_active = Gauge(
            "omni_sessions_active", "Realtime sessions open now.", registry=self.registry
        )
        self.sessions_total = Counter(
            "omni_sessions_total", "Realtime sessions opened.", registry=self.registry
        )
        self.connections_refused = Counter(
            "omni_connections_refused_total",
            "Realtime connections refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.responses = Counter(
            "omni_responses_total",
            "Responses finished, by status.",
            ["status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "omni_client_errors_total",
            "Error events sent to clients, by code.",
            ["code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "omni_turn_stage_seconds",
            "Per-turn latency by stage: engine stages from the end of the user's turn, "
            "vad_end_to_first_audio from the VAD's end-of-speech decision to the first audio sent.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.draining = Gauge(
            "omni_draining",
            "1 while the server is shutting down: no new calls, open ones finishing.",
            registry=self.registry,
        )

    def watch_engine(self, engine: Callable[[], object | None]) -> None:
        """Export the engine's own counters, read at scrape time from `engine()`."""
        self.registry.register(_EngineCollector(engine))

    def observe_stage_ms(self, stage: str, ms: float | None) -> None:
        if ms is not None:
            self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine counts its worker restarts itself (OmniEngine.restarts); a collector reads
    the number when scraped, so the engine needs no metrics code."""

    def __init__(self, engine: Callable[[], object | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        # engines without a supervisor (the tests' fake one) have no `restarts`: 0
        restarts = getattr(self._engine(), "restarts", 0)
        yield CounterMetricFamily(
            "omni_engine_worker_restarts",
            "Times the model workers were restarted after one died or hung.",
            value=restarts,
        )
        # each worker's KV memory, as its last heartbeat reported it (OmniEngine.kv_stats)
        kv: dict[str, dict[str, int]] = getattr(self._engine(), "kv_stats", {})
        for name, doc in (
            ("bytes_used", "KV memory holding conversation context now, per model stage."),
            ("bytes_total", "KV memory reserved (max_sessions slots of max_context_tokens)."),
            ("tokens_used", "Context tokens in the KV memory now, per model stage."),
            ("slots_used", "KV slots (sessions) in use, per model stage."),
        ):
            family = GaugeMetricFamily(f"omni_kv_{name}", doc, labels=["stage"])
            for stage, stats in kv.items():
                family.add_metric([stage], stats.get(name, 0))
            yield family
