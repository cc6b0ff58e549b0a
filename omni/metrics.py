"""Prometheus metrics for calls: sessions, responses, errors and per-turn stage latencies.

prometheus-client is the reference implementation of the exposition format. Each app gets
its own `CollectorRegistry` (not the global default) so several servers in one process (the
tests) keep separate numbers and never collide on registration.

/metrics has a listener of its own (`metrics_host`:`metrics_port`), not a route on the API
port: whatever fronts the API (Caddy, an Ingress) then cannot expose it, and Prometheus
scrapes it with no credentials to hand out (its pod annotations carry none). It is
prometheus-client's own threaded HTTP server, so a scrape never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# seconds; dense around the 0.2-1 s that separates a natural reply from an awkward one
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
STAGES = ("vad_end_to_first_audio", "prefill", "first_text", "first_codec", "first_audio", "total")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port: int | None = None  # of the /metrics listener, once `serving`
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
        self.transcriptions = Counter(
            "omni_transcriptions_total",
            "User audio items transcribed (audio.input.transcription), by status.",
            ["status"],
            registry=self.registry,
        )
        self.transcription_seconds = Histogram(
            "omni_transcription_seconds",
            "From a user audio item's commit to its completed transcript (queueing included).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.speculations = Counter(
            "omni_speculations_total",
            "Speculative replies (started at a pause in the caller's speech), by outcome: hit "
            "(the turn ended there; the reply was sent) or miss (discarded unheard).",
            ["outcome"],
            registry=self.registry,
        )
        self.speculation_discarded = Counter(
            "omni_speculation_discarded_total",
            "What discarded speculative replies generated, by unit: thinker text tokens, "
            "talker codec frames (20 ms each), and model seconds (the reply's engine time).",
            ["unit"],
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

    @asynccontextmanager
    async def serving(self, host: str, port: int) -> AsyncIterator[None]:
        """Serve /metrics on `host`:`port` for the block (`self.port`: the port bound)."""
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve /metrics on {host}:{port} ({exc.strerror}): set metrics_port "
                "(0: any free port)"
            ) from exc
        self.port = server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        try:
            yield
        finally:
            # shutdown() waits for the serving thread's next poll: not on the event loop
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            thread.join()


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
        # each session's thinker context (what its context budget bounds), per heartbeat
        contexts: dict[str, int] = getattr(self._engine(), "context_tokens", {})
        family = GaugeMetricFamily(
            "omni_context_tokens", "Thinker context tokens of each open session.", labels=["session"]
        )
        for session, tokens in contexts.items():
            family.add_metric([session], tokens)
        yield family
