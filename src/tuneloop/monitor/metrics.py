"""Prometheus metrics of the gateway (``GET /metrics``), with prometheus-client.

Entry point: :class:`GatewayMetrics`. Each instance has its own ``CollectorRegistry`` unless one is given,
so several gateways (or tests) in one process do not collide.

Metrics (labels in braces):

* ``tuneloop_requests_total{model,version,arm,endpoint,status}`` counter
* ``tuneloop_request_errors_total{model,version,arm,endpoint,status}`` counter: status >= 500 unless the
  caller says otherwise (``error=`` in :meth:`GatewayMetrics.observe`, e.g. an empty output with 200)
* ``tuneloop_request_latency_seconds{model,version,arm,endpoint}`` histogram
* ``tuneloop_time_to_first_token_seconds{model,version,arm,endpoint}`` histogram (streamed requests)
* ``tuneloop_tokens_total{model,version,arm,kind}`` counter, ``kind`` = ``prompt`` | ``completion``
* ``tuneloop_queue_depth{model}`` gauge, set by the gateway's batcher
* ``tuneloop_request_log_records_total{kind,outcome}`` counter: request log records (``kind`` = ``request`` |
  ``feedback``) ``written`` to the store, ``spooled`` while it was unavailable, ``replayed`` from the spool, or
  ``dropped`` (lost: a full queue or spool, a record the store refuses; the gateway's log says why)
* ``tuneloop_request_log_spooled_records`` and ``tuneloop_request_log_spool_bytes`` gauges: what waits in the
  spool now; ``tuneloop_request_log_store_up`` gauge: 0 while the store is unavailable
  (the last four read the request recorder at scrape time: :meth:`GatewayMetrics.watch_request_log`)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: Seconds; LLM requests span milliseconds (a cached short answer) to minutes (a long generation).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_REQUEST_LABELS = ("model", "version", "arm", "endpoint", "status")
_TIMING_LABELS = ("model", "version", "arm", "endpoint")


class GatewayMetrics:
    """The gateway's counters, histograms and gauges on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.requests = Counter(
            "tuneloop_requests",
            "Requests answered, by model, version, arm, endpoint, status",
            _REQUEST_LABELS,
            registry=r,
        )
        self.errors = Counter(
            "tuneloop_request_errors",
            "Requests that failed (5xx, or an empty or failed output)",
            _REQUEST_LABELS,
            registry=r,
        )
        self.latency = Histogram(
            "tuneloop_request_latency_seconds",
            "Time from request to the last byte",
            _TIMING_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tuneloop_time_to_first_token_seconds",
            "Time from request to the first generated token",
            _TIMING_LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tuneloop_tokens",
            "Tokens processed, by kind (prompt or completion)",
            ("model", "version", "arm", "kind"),
            registry=r,
        )
        self.queue_depth = Gauge("tuneloop_queue_depth", "Requests waiting in the batcher", ("model",), registry=r)

    def observe(
        self,
        *,
        model: str,
        version: str,
        arm: str,
        endpoint: str,
        status: int,
        latency_s: float,
        ttft_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        error: bool | None = None,
    ) -> None:
        """Count one finished request. ``error`` overrides the default rule (status >= 500)."""
        version = str(version)
        labels = (model, version, arm, endpoint, str(int(status)))
        self.requests.labels(*labels).inc()
        if (int(status) >= 500) if error is None else error:
            self.errors.labels(*labels).inc()
        self.latency.labels(model, version, arm, endpoint).observe(max(float(latency_s), 0.0))
        if ttft_s is not None:
            self.ttft.labels(model, version, arm, endpoint).observe(max(float(ttft_s), 0.0))
        if prompt_tokens > 0:
            self.tokens.labels(model, version, arm, "prompt").inc(prompt_tokens)
        if completion_tokens > 0:
            self.tokens.labels(model, version, arm, "completion").inc(completion_tokens)

    def watch_request_log(self, recorder) -> None:
        """Export ``recorder``'s counts (an ``AsyncRecorder``) at each scrape (nothing on the request path)."""
        self.registry.register(_RequestLogCollector(recorder))

    def render(self) -> tuple[bytes, str]:
        """``(body, content_type)`` for ``GET /metrics`` in the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RequestLogCollector:
    """The request recorder's counts and spool as Prometheus metrics, read when scraped."""

    def __init__(self, recorder):
        self.recorder = recorder

    def describe(self):
        return []  # read at scrape time only (prometheus-client calls collect() when describe() is empty)

    def collect(self):
        r = self.recorder
        records = CounterMetricFamily(
            "tuneloop_request_log_records",
            "Request log records by kind (request, feedback) "
            "and outcome: written to the store, spooled while it was unavailable, replayed "
            "from the spool, dropped (lost)",
            labels=("kind", "outcome"),
        )
        for kind in ("request", "feedback"):
            for outcome in ("written", "spooled", "replayed", "dropped"):
                records.add_metric((kind, outcome), r.counts.get((kind, outcome), 0))
        yield records
        spool = r.spool
        yield GaugeMetricFamily(
            "tuneloop_request_log_spooled_records",
            "Request log records in the local spool, not yet in the store",
            value=0 if spool is None else spool.records,
        )
        yield GaugeMetricFamily(
            "tuneloop_request_log_spool_bytes",
            "Bytes of the request log's local spool",
            value=0 if spool is None else spool.bytes,
        )
        yield GaugeMetricFamily(
            "tuneloop_request_log_store_up",
            "1 while the request log store takes writes, 0 while it is unavailable",
            value=0 if r.store_error else 1,
        )
