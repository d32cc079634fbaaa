"""Micro-batching of concurrent recalls into one :meth:`RecallEngine.recall_batch` call.

One ONNX Runtime run and one FAISS search for B users cost far less than B runs of one, so
under load gathering requests raises throughput.  At low load it must not cost latency, so
the rule is:

* no batch in flight: dispatch what is queued at once (a lone request never waits);
* a batch in flight and a free compute slot: gather newcomers for at most ``wait_s`` after
  the oldest one arrived (or until ``max_batch``), then dispatch;
* every slot busy (``concurrency`` batches in flight): requests queue, and the next free
  slot takes up to ``max_batch`` of them at once.

A request waits on its own future with its own deadline; when it gives up, the future is
cancelled and the batch it may already belong to runs on in its thread, its answer for that
request dropped.  Requests still queued with a cancelled future are never computed.  The
queue is bounded by the app's in-flight cap, not here.  Only requests for the same engine
object share a batch, so a hot swap never mixes versions in one call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from contracts.sessions import Session
from service.core import RecallEngine, RecallRequest, RecallResult

if TYPE_CHECKING:
    from service.observability import Metrics

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    """What a request gets back: its result and the batch's shared facts."""

    result: RecallResult
    batch_size: int
    queue_s: float
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Pending:
    engine: RecallEngine
    request: RecallRequest
    session: Session
    future: asyncio.Future[BatchOutcome]
    enqueued: float


class MicroBatcher:
    """Gathers submitted recalls into batches; one dispatcher task per app (per loop)."""

    def __init__(
        self,
        concurrency: int,
        max_batch: int,
        wait_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        if concurrency < 1 or max_batch < 1 or wait_s < 0:
            raise ValueError("concurrency and max_batch must be >= 1, wait_s >= 0")
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.metrics = metrics
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._queue: deque[_Pending] = deque()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch_forever(), name="micro-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in self._queue:
            pending.future.cancel()
        self._queue.clear()
        # Batches in threads cannot be interrupted; let them finish (bounded by the engine).
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(
        self, engine: RecallEngine, request: RecallRequest, session: Session
    ) -> asyncio.Future[BatchOutcome]:
        """Queue one recall; await the returned future (with a timeout: it is cancelled)."""
        if self._task is None or self._task.done():
            raise RuntimeError("micro-batcher is not running")
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(engine, request, session, future, time.perf_counter()))
        self._wakeup.set()
        return future

    async def _dispatch_forever(self) -> None:
        while True:
            # Clear first, then look: nothing can set the event between the two (no await).
            self._wakeup.clear()
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # abandoned before it was computed
            if not self._queue or self._in_flight >= self.concurrency:
                await self._wakeup.wait()
                continue
            if self._in_flight > 0 and len(self._queue) < self.max_batch:
                gather_left = self._queue[0].enqueued + self.wait_s - time.perf_counter()
                if gather_left > 0:
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), gather_left)
                    except TimeoutError:
                        pass
                    continue
            self._launch(self._take_batch())

    def _take_batch(self) -> list[_Pending]:
        engine = self._queue[0].engine
        batch: list[_Pending] = []
        kept: deque[_Pending] = deque()
        while self._queue and len(batch) < self.max_batch:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            (batch if pending.engine is engine else kept).append(pending)
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def _launch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        self._in_flight += 1
        task = asyncio.create_task(self._run(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        engine = batch[0].engine
        loop = asyncio.get_running_loop()
        now = time.time()

        def deliver(
            group: list[_Pending],
            results: list[RecallResult],
            timings: dict[str, float],
            counts: dict[str, int],
        ) -> None:
            # On the event loop: one engine call's results and metrics.
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(group))
                for stage, seconds in timings.items():
                    self.metrics.stage_latency.labels(stage).observe(seconds)
                for result_kind, label in (("xhat_hit", "hit"), ("xhat_miss", "miss")):
                    if counts.get(result_kind):
                        self.metrics.xhat_cache.labels(label).inc(counts[result_kind])
            for pending, result in zip(group, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(
                        BatchOutcome(result, len(group), started - pending.enqueued, timings)
                    )

        def compute() -> None:
            # In a worker thread.  Requests whose xhat is cached are computed and answered
            # first, so they never wait for the reverse process of the batch's misses.
            for positions in engine.cache_groups([p.session for p in batch]):
                group = [batch[i] for i in positions]
                timings: dict[str, float] = {}
                counts: dict[str, int] = {}
                results = engine.recall_batch(
                    [p.request for p in group], [p.session for p in group], now, timings, counts
                )
                loop.call_soon_threadsafe(deliver, group, results, timings, counts)

        try:
            await anyio.to_thread.run_sync(compute, limiter=self._limiter)
        except Exception as exc:
            log.exception("recall batch of %d failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
                    # Retrieved or not, the request logged/handled it: no asyncio warning.
                    pending.future.exception()
        finally:
            self._in_flight -= 1
            self._wakeup.set()
