"""GatewayMetrics: what /metrics serves, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.monitor.metrics import GatewayMetrics


def samples(metrics: GatewayMetrics) -> dict[tuple, float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels) -> tuple:
    return name, tuple(sorted(labels.items()))


def observe(m: GatewayMetrics, **kw) -> None:
    args = dict(
        model="bot",
        version="3",
        arm="canary",
        endpoint="chat.completions",
        status=200,
        latency_s=0.2,
        ttft_s=0.05,
        prompt_tokens=10,
        completion_tokens=4,
    )
    m.observe(**{**args, **kw})


def test_counters_histograms_and_tokens():
    m = GatewayMetrics()
    observe(m)
    observe(m, latency_s=3.0, ttft_s=None, completion_tokens=0)
    observe(m, status=503, latency_s=0.01, ttft_s=None, prompt_tokens=0, completion_tokens=0)
    observe(m, status=200, error=True)  # an empty output: 200 but an error
    observe(m, status=400, version=2, arm="baseline")  # a client error is not counted as an error
    s = samples(m)
    ok = dict(model="bot", version="3", arm="canary", endpoint="chat.completions")
    assert s[key("tuneloop_requests_total", **ok, status="200")] == 3
    assert s[key("tuneloop_requests_total", **ok, status="503")] == 1
    assert (
        s[
            key(
                "tuneloop_requests_total",
                model="bot",
                version="2",
                arm="baseline",
                endpoint="chat.completions",
                status="400",
            )
        ]
        == 1
    )
    assert s[key("tuneloop_request_errors_total", **ok, status="503")] == 1
    assert s[key("tuneloop_request_errors_total", **ok, status="200")] == 1
    assert (
        key(
            "tuneloop_request_errors_total",
            model="bot",
            version="2",
            arm="baseline",
            endpoint="chat.completions",
            status="400",
        )
        not in s
    )
    assert s[key("tuneloop_request_latency_seconds_count", **ok)] == 4
    assert s[key("tuneloop_request_latency_seconds_sum", **ok)] == pytest.approx(0.2 + 3.0 + 0.01 + 0.2)
    assert s[key("tuneloop_request_latency_seconds_bucket", **ok, le="0.25")] == 3
    assert s[key("tuneloop_request_latency_seconds_bucket", **ok, le="+Inf")] == 4
    assert s[key("tuneloop_time_to_first_token_seconds_count", **ok)] == 2
    assert s[key("tuneloop_time_to_first_token_seconds_bucket", **ok, le="0.05")] == 2
    tok = dict(model="bot", version="3", arm="canary")
    assert s[key("tuneloop_tokens_total", **tok, kind="prompt")] == 30
    assert s[key("tuneloop_tokens_total", **tok, kind="completion")] == 8


def test_queue_depth_and_separate_registries():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.queue_depth.labels(model="bot").set(7)
    observe(a)
    assert samples(a)[key("tuneloop_queue_depth", model="bot")] == 7
    assert not [k for k in samples(b) if k[0] == "tuneloop_requests_total"]  # b saw nothing
    shared = CollectorRegistry()
    c = GatewayMetrics(shared)
    assert c.registry is shared
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GatewayMetrics(shared)  # one GatewayMetrics per registry


def test_render_is_prometheus_text():
    m = GatewayMetrics()
    observe(m, model='we"ird\nname')
    body, _ = m.render()
    text = body.decode()
    assert "# TYPE tuneloop_requests_total counter" in text
    assert "# TYPE tuneloop_request_latency_seconds histogram" in text
    assert 'model="we\\"ird\\nname"' in text  # label values escaped, so the page stays parseable
    assert samples(m)  # and the parser reads it back
