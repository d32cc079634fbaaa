"""Metrics (Prometheus) and structured logs (one JSON object per line) of the service.

Every metric lives in a registry owned by one app (:class:`Metrics`), not prometheus-client's
process-global default: several apps in one process (tests) never collide, and ``/metrics``
shows exactly this app's series.  Names and labels are documented in docs/operations.md.

The request id of the request being served sits in a context variable; the log filter adds
it to every record logged while serving that request, whichever module logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUEST_ID_HEADER = "x-request-id"
# What we accept as a caller's request id: short, printable, no separators that could
# forge log lines or headers.  Anything else is replaced by a fresh id.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Seconds; recall budgets are milliseconds, reloads seconds.
# Dense between 10 and 100 ms, where the SLO (p99 <= 50 ms) and the budgets sit.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def accept_request_id(value: str | None) -> str:
    """The caller's ``X-Request-ID`` when well formed, else a new random one."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return uuid.uuid4().hex


class Metrics:
    """The service's Prometheus series, in one registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "t2diff_requests_total",
            "HTTP requests by endpoint, method and status code",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "t2diff_request_latency_seconds",
            "HTTP request latency by endpoint (first byte in to last byte out)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "t2diff_stage_latency_seconds",
            "Recall stage latency: redis, queue (waiting for a batch), tower (diffusion + "
            "attention when split), ann, filter",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "t2diff_degraded_total",
            "Recall answers served by the fallback, by reason",
            ["reason"],
            registry=r,
        )
        self.cold_start = Counter(
            "t2diff_cold_start_total", "Recall answers for users with no known item", registry=r
        )
        self.batch_size = Histogram(
            "t2diff_batch_size",
            "Requests per engine call (micro-batch size)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.xhat_cache = Counter(
            "t2diff_xhat_cache_total",
            "Rows of the split tower's diffusion output (xhat) found in the cache (hit) or "
            "computed (miss)",
            ["result"],
            registry=r,
        )
        self.xhat_cache_entries = Gauge(
            "t2diff_xhat_cache_entries",
            "Entries in the serving version's xhat cache",
            registry=r,
        )
        self.xhat_warm = Counter(
            "t2diff_xhat_warm_total",
            "Warms of a loaded version's xhat cache, by trigger (startup, swap) and outcome "
            "(complete, time_bound, failed, off, no_cache)",
            ["trigger", "outcome"],
            registry=r,
        )
        self.xhat_warm_sessions = Gauge(
            "t2diff_xhat_warm_sessions",
            "Sessions whose xhat the last warm computed",
            registry=r,
        )
        self.xhat_warm_seconds = Gauge(
            "t2diff_xhat_warm_seconds", "Duration of the last xhat warm", registry=r
        )
        self.xhat_recompute = Counter(
            "t2diff_xhat_recompute_total",
            "Users queued for a background xhat recompute after an event write, by result: "
            "computed, unchanged (already cached or no known item), dropped (queue full), "
            "failed, skipped (no cache)",
            ["result"],
            registry=r,
        )
        self.xhat_recompute_queue = Gauge(
            "t2diff_xhat_recompute_queue",
            "Users waiting for a background xhat recompute",
            registry=r,
        )
        self.redis_errors = Counter(
            "t2diff_redis_errors_total",
            "Failed Redis operations, by operation and error kind",
            ["op", "kind"],
            registry=r,
        )
        self.redis_up = Gauge(
            "t2diff_redis_up",
            "1 when the last Redis call (session read or write, /readyz ping) succeeded, "
            "else 0; Redis down degrades answers but does not make the service unready",
            registry=r,
        )
        self.in_flight = Gauge(
            "t2diff_in_flight_requests", "Requests being served (recall + events)", registry=r
        )
        self.shed = Counter(
            "t2diff_shed_total", "Requests refused with 503 because of overload", registry=r
        )
        self.events = Counter(
            "t2diff_events_total",
            "Behaviours received by POST /events, by outcome (written, duplicate)",
            ["outcome"],
            registry=r,
        )
        self.reloads = Counter(
            "t2diff_reloads_total",
            "Attempts to load a new model/index version, by trigger and result",
            ["trigger", "result"],
            registry=r,
        )
        self.version = Gauge(
            "t2diff_version_info",
            "1 for the model and index version being served (labels), absent before loading",
            ["model_version", "index_version"],
            registry=r,
        )
        self._version_labels: tuple[str, str] | None = None

    def set_version(self, model_version: str, index_version: str) -> None:
        if self._version_labels is not None:
            self.version.remove(*self._version_labels)
        self._version_labels = (model_version, index_version)
        self.version.labels(model_version, index_version).set(1)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


# LogRecord attributes that are not "extra" fields.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, then any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id_var.get()),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = _jsonable(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def configure_logging(level: str, json_lines: bool = True) -> None:
    """Root logging for the serving process: JSON lines (or plain text) to stderr."""
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
        )
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
