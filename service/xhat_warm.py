"""Near-line ``xhat``: the split tower's diffusion output computed before a recall asks.

A recall whose ``xhat`` is cached costs ~0.5 ms of tower time instead of ~10 ms (width-16
ML-1M tower, docs/results/load.md), so the misses set the latency tail.  Two sources of
misses are removed here, both exactly (the rows and keys are a recall's own, through
:meth:`service.tower.UserTowerRunner.fill_xhat`, so a warmed answer is bit-for-bit the
answer a cold recall computes):

* **Warm on load** (:func:`warm_xhat`): when a model version is loaded, the sessions of the
  ``XHAT_WARM_USERS`` most recently active users (Redis ZSET ``{prefix}:active``, kept by
  ``POST /events`` and ``t2diff sessions load``; SCAN of the session keys when the ZSET is
  empty) are read from Redis and their ``xhat`` computed in batches, for at most
  ``XHAT_WARM_SECONDS``.  At startup it runs at normal priority on ``XHAT_WARM_THREADS``
  threads while ``/readyz`` says "warming"; on a hot swap it runs on the background thread
  *before* the new version is switched in, while the old one serves.
* **Recompute on write** (:class:`XhatRecomputer`): after a successful ``POST /events`` the
  user's new session is queued (bounded, deduplicated, dropped when full) and its ``xhat``
  computed on the background thread, so the user's next recall hits.

Background work runs in one thread whose nice level is raised (``XHAT_BACKGROUND_NICE``,
default 19; Linux applies nice per thread, and ONNX Runtime with one intra-op thread runs
the graph in the calling thread), so a live recall always gets the cores first: the
background only uses CPU the recalls leave idle.  A failure (Redis down, a timeout, a
broken graph) is logged and counted, never raised into serving: the service then serves
with a colder cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.failures import REDIS_ERRORS

if TYPE_CHECKING:
    from service.core import RecallEngine
    from service.observability import Metrics
    from service.sessions import SessionStore

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice level to ``nice`` (a ThreadPoolExecutor initializer).

    ``setpriority(PRIO_PROCESS, tid)`` acts on one thread on Linux; an unprivileged process
    may always lower its own priority.  Elsewhere (or when refused) the thread keeps its
    priority and only the bounded queue limits the background work.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:
        log.warning("background xhat thread keeps its priority: %s", exc)


def background_executor(nice: int) -> ThreadPoolExecutor:
    """One low-priority thread for the recompute and a hot swap's warm: one at a time, so
    the background never takes more than one core."""
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="xhat-background",
        initializer=lower_thread_priority,
        initargs=(nice,),
    )


@dataclass
class WarmProgress:
    """What a warm did (updated while it runs, for ``/readyz`` and the log).

    ``outcome``: ``running``, then ``complete`` (every user read), ``time_bound`` (stopped
    at ``XHAT_WARM_SECONDS``), ``failed`` (Redis or the tower failed; what was computed
    stays cached), ``off`` (a bound is 0) or ``no_cache`` (the export has no split tower,
    or the cache is off).
    """

    trigger: str
    outcome: str = "running"
    users: int = 0
    sessions_computed: int = 0
    seconds: float = 0.0
    error: str | None = None


async def warm_xhat(
    engine: RecallEngine,
    store: SessionStore,
    *,
    progress: WarmProgress,
    max_users: int,
    max_seconds: float,
    batch_size: int,
    session_max_len: int,
    executor: Executor,
    workers: int,
    redis_timeout_s: float,
) -> WarmProgress:
    """Fill ``engine``'s xhat cache with the sessions of the most recently active users.

    Users are read ``batch_size`` at a time (one pipelined Redis round trip each, decoded
    on the event loop in a few ms, so a live recall beside a hot swap's warm waits little)
    and computed on ``executor`` with up to ``workers`` batches in flight.  Never raises
    for Redis or tower failures: they end the warm with outcome ``failed``.
    """
    tower = engine.tower
    started = time.monotonic()
    if max_users <= 0 or max_seconds <= 0:
        progress.outcome = "off"
        return progress
    if tower.xhat_cache is None:
        progress.outcome = "no_cache"
        return progress
    deadline = started + max_seconds
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Future[int]] = set()

    async def collect(until: int) -> None:
        nonlocal in_flight
        while len(in_flight) > until:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                progress.sessions_computed += future.result()

    try:
        users = await asyncio.wait_for(store.recent_users(max_users), redis_timeout_s)
        if not users:
            # Sessions written before the activity ZSET existed: any users will do.
            left = max(0.0, deadline - time.monotonic())
            users = await asyncio.wait_for(store.scan_users(max_users), left)
        progress.users = len(users)
        progress.outcome = "complete"
        for first in range(0, len(users), batch_size):
            if time.monotonic() >= deadline:
                progress.outcome = "time_bound"
                break
            chunk = users[first : first + batch_size]
            sessions = await asyncio.wait_for(
                store.get_sessions(chunk, session_max_len), redis_timeout_s
            )
            tokens = [t for t in (tower.tokens_for(s) for s in sessions) if t]
            await collect(workers - 1)
            in_flight.add(
                loop.run_in_executor(executor, tower.fill_xhat, tokens, batch_size, deadline)
            )
        await collect(0)
        if time.monotonic() >= deadline and progress.outcome == "complete":
            progress.outcome = "time_bound"  # the last batches may have stopped early
    except REDIS_ERRORS as exc:
        progress.outcome, progress.error = "failed", f"redis: {type(exc).__name__}: {exc}"
    except Exception as exc:  # a tower failure must not stop serving
        progress.outcome, progress.error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("xhat warm failed")
    finally:
        # Batches already handed to threads run on (they stop at the deadline); their rows
        # land in the cache, but the warm does not wait for them after a failure.
        progress.seconds = time.monotonic() - started
    return progress


def record_warm(metrics: Metrics, progress: WarmProgress, model_version: str) -> None:
    """Metrics and one log line for a finished warm."""
    metrics.xhat_warm.labels(progress.trigger, progress.outcome).inc()
    metrics.xhat_warm_sessions.set(progress.sessions_computed)
    metrics.xhat_warm_seconds.set(progress.seconds)
    level = logging.WARNING if progress.outcome == "failed" else logging.INFO
    log.log(
        level,
        "xhat warm (%s) of model %s: %s, %d users read, %d sessions computed in %.1fs%s",
        progress.trigger,
        model_version,
        progress.outcome,
        progress.users,
        progress.sessions_computed,
        progress.seconds,
        f" ({progress.error})" if progress.error else "",
    )


class XhatRecomputer:
    """After an event write, compute the user's new ``xhat`` in the background.

    ``submit`` (on the event loop, from ``POST /events``) queues user ids: deduplicated (a
    user already waiting keeps its place), at most ``max_queue`` of them, newcomers dropped
    and counted when full.  One task takes up to ``batch_size`` users at a time, reads their
    sessions from Redis and runs :meth:`~service.tower.UserTowerRunner.fill_xhat` on the
    low-priority background thread, for whichever engine is serving at that moment.
    """

    def __init__(
        self,
        engine_of: Callable[[], RecallEngine | None],
        store: SessionStore,
        executor: Executor,
        metrics: Metrics,
        *,
        max_queue: int,
        batch_size: int,
        session_max_len: int,
        redis_timeout_s: float,
    ) -> None:
        if max_queue < 1:
            raise ValueError("the recompute queue holds at least one user")
        self._engine_of = engine_of
        self._store = store
        self._executor = executor
        self._metrics = metrics
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.session_max_len = session_max_len
        self.redis_timeout_s = redis_timeout_s
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Users taken from the queue and not yet computed (tests wait on it with idle()).
        self._busy = 0
        metrics.xhat_recompute_queue.set_function(lambda: len(self._queue))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="xhat-recompute")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def pending(self) -> int:
        """Users queued or being computed."""
        return len(self._queue) + self._busy

    def submit(self, user_ids: Iterable[str]) -> None:
        engine = self._engine_of()
        if engine is None or engine.tower.xhat_cache is None:
            return  # nothing to fill: no split tower or no cache
        for user_id in user_ids:
            if user_id in self._queue:
                continue
            if len(self._queue) >= self.max_queue:
                self._metrics.xhat_recompute.labels("dropped").inc()
                continue
            self._queue[user_id] = None
        self._wakeup.set()

    async def _run_forever(self) -> None:
        while True:
            self._wakeup.clear()
            if not self._queue:
                await self._wakeup.wait()
                continue
            users = []
            while self._queue and len(users) < self.batch_size:
                users.append(self._queue.popitem(last=False)[0])
            self._busy = len(users)
            try:
                await self._recompute(users)
            except Exception:  # never let the task die
                log.exception("xhat recompute failed")
                self._metrics.xhat_recompute.labels("failed").inc(len(users))
            finally:
                self._busy = 0

    async def _recompute(self, users: list[str]) -> None:
        engine = self._engine_of()
        if engine is None or engine.tower.xhat_cache is None:
            self._metrics.xhat_recompute.labels("skipped").inc(len(users))
            return
        try:
            sessions = await asyncio.wait_for(
                self._store.get_sessions(users, self.session_max_len), self.redis_timeout_s
            )
        except REDIS_ERRORS as exc:
            self._metrics.xhat_recompute.labels("failed").inc(len(users))
            log.warning("xhat recompute: session read failed: %s: %s", type(exc).__name__, exc)
            return
        tokens = [t for t in (engine.tower.tokens_for(s) for s in sessions) if t]
        loop = asyncio.get_running_loop()
        computed = await loop.run_in_executor(
            self._executor, engine.tower.fill_xhat, tokens, self.batch_size, None
        )
        self._metrics.xhat_recompute.labels("computed").inc(computed)
        # Already cached (an idempotent retry, or a recall got there first) or no known item.
        self._metrics.xhat_recompute.labels("unchanged").inc(len(users) - computed)

    async def idle(self, poll_s: float = 0.01) -> None:
        """Return once nothing is queued or being computed (for tests and shutdown)."""
        while self.pending:
            await asyncio.sleep(poll_s)
