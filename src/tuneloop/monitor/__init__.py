"""Monitoring: the request and feedback log (SQLite or PostgreSQL) and the gateway's Prometheus metrics.

``open_request_log(url)`` -> :class:`RequestLog` (``monitor/requestlog.py``); :class:`GatewayMetrics` is in
``monitor/metrics.py``.
"""

from tuneloop.monitor.requestlog import (
    AsyncRecorder,
    FeedbackRecord,
    RequestLog,
    RequestRecord,
    UnknownRequest,
    default_log_url,
    open_request_log,
)

__all__ = [
    "AsyncRecorder",
    "FeedbackRecord",
    "RequestLog",
    "RequestRecord",
    "UnknownRequest",
    "default_log_url",
    "open_request_log",
]
