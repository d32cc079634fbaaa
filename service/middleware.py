"""One plain ASGI middleware around the app: request id, body limit, load shedding,
per-endpoint metrics and the access log.

Plain ASGI (not Starlette's ``BaseHTTPMiddleware``): no extra task per request, and the
body can be read, bounded and replayed.

* Request id: the caller's ``X-Request-ID`` when well formed, else a new one; set in a
  context variable (every log line of the request carries it) and returned in the
  response's ``X-Request-ID`` header.
* Body limit: a body over ``max_body_bytes`` (by ``Content-Length`` or as it streams) is
  refused with 413 before the app sees any of it, so nothing is parsed or written.
* Load shedding: at most ``max_in_flight`` requests to the working endpoints at once;
  beyond it 503 with ``Retry-After``, answered at once, so the queue cannot grow without
  bound and a client backs off instead of timing out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.observability import (
    REQUEST_ID_HEADER,
    Metrics,
    accept_request_id,
    request_id_var,
)

log = logging.getLogger("service.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Metric label values are bounded: known endpoints by name, everything else "other".
KNOWN_ENDPOINTS = frozenset(
    {
        "/recall",
        "/events",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/reload",
        "/admin/rollback",
        "/docs",
        "/openapi.json",
    }
)
# Endpoints that do work (Redis, inference) and so count against the in-flight cap.
SHED_ENDPOINTS = frozenset({"/recall", "/events"})
LOG_FIELDS_KEY = "t2diff_log_fields"


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        max_in_flight: int,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        raw_id = headers.get(REQUEST_ID_HEADER)
        request_id = accept_request_id(raw_id.decode("latin-1") if raw_id else None)
        token = request_id_var.set(request_id)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        method = scope.get("method", "GET")
        fields: dict[str, Any] = {}
        scope.setdefault("state", {})[LOG_FIELDS_KEY] = fields
        status = 500
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        started_response = finished_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response, finished_response
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), id_header]
                started_response = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished_response = True
            await send(message)

        counted = endpoint in SHED_ENDPOINTS
        try:
            if counted and self.in_flight >= self.max_in_flight:
                self.metrics.shed.inc()
                fields["shed"] = True
                await _respond(
                    send_with_id,
                    503,
                    {"detail": "overloaded, retry later"},
                    [(b"retry-after", str(self.retry_after_s).encode())],
                )
                return
            if counted:
                self.in_flight += 1
                self.metrics.in_flight.inc()
            try:
                body_receive = await self._bounded_body(scope, receive, headers)
                if body_receive is None:
                    await _respond(
                        send_with_id,
                        413,
                        {"detail": f"request body over {self.max_body_bytes} bytes"},
                    )
                    return
                await self.app(scope, body_receive, send_with_id)
            except Exception:
                # A bug, not an input: answered as a JSON 500 with the request id, and not
                # re-raised, so the server keeps the caller's keep-alive connection (an
                # exception escaping the app makes uvicorn close it).  Only a response cut
                # off half-sent cannot be mended: the connection has to go.
                log.exception("unhandled error", extra={"method": method, "endpoint": endpoint})
                if not started_response:
                    await _respond(
                        send_with_id,
                        500,
                        {"detail": "internal error", "request_id": request_id},
                    )
                elif not finished_response:
                    raise
            finally:
                if counted:
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
            if endpoint not in ("/healthz", "/metrics"):
                log.info(
                    "request",
                    extra={
                        "method": method,
                        "endpoint": endpoint,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 3),
                        **fields,
                    },
                )
            request_id_var.reset(token)

    async def _bounded_body(
        self, scope: Scope, receive: Receive, headers: dict[str, bytes]
    ) -> Receive | None:
        """A receive that replays the whole (bounded) body; None when it is too large."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        declared = headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    return None
            except ValueError:
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                replay_disconnect = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                replay_disconnect = None
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if replay_disconnect is not None:
                return replay_disconnect
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _respond(
    send: Send,
    status: int,
    payload: dict[str, Any],
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
