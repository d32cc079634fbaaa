"""How a failing dependency looks to the service: the errors a Redis call can raise, the
circuit breaker that stops calling a Redis that keeps failing, and failures as one-line
reasons (logs, ``/readyz``, degraded answers).

Plain Python (no web framework): the recall flow (:mod:`service.recall_flow`), the
service state and the near-line xhat warm share it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

# What a failing Redis call can raise: redis-py wraps most socket errors, but not all.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


def reason_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def is_pool_exhausted(exc: BaseException) -> bool:
    """No pooled connection freed up in time: redis-py's ``BlockingConnectionPool`` raises
    ``ConnectionError("No connection available.")`` from its wait's ``asyncio``
    timeout.  Redis itself may be healthy; the pool (``REDIS_MAX_CONNECTIONS``) is too
    small for the requests in flight, so it is not a Redis failure."""
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, asyncio.TimeoutError)


class RedisBreaker:
    """Consecutive-failure circuit breaker: after ``failures`` failed calls in a row, calls
    are refused for ``open_s`` seconds (requests answer degraded at once instead of each
    waiting on a dead Redis); then calls are let through again, and the first success
    closes it."""

    def __init__(
        self, failures: int, open_s: float, on_outcome: Callable[[bool], None] | None = None
    ) -> None:
        self.failures = failures
        self.open_s = open_s
        self._consecutive = 0
        self._open_until = 0.0
        # Told each call's outcome (True: success): the Redis health gauge.
        self._on_outcome = on_outcome

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    @property
    def is_open(self) -> bool:
        return not self.allow()

    def success(self) -> None:
        self._consecutive = 0
        self._open_until = 0.0
        if self._on_outcome is not None:
            self._on_outcome(True)

    def failure(self) -> None:
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._open_until = time.monotonic() + self.open_s
        if self._on_outcome is not None:
            self._on_outcome(False)
