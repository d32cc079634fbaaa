"""What one app instance holds: the engine being served, the session store, the batcher,
the Redis circuit breaker, and the hot-swap logic.

Hot swap.  ``artifacts_dir`` and ``index_dir`` are normally the links ``artifacts/current``
and ``indexes/current``; a promotion re-points them (index first, then artifacts).  The
watcher polls both links' realpaths; when they changed and both manifests name the same
``model_version`` (so a half-done promotion is never loaded), it loads the new tower and
index *beside* the old ones in a thread, warms them up, then replaces the single
``engine`` reference.  A request reads that reference once and uses the object it got for
its whole life, so it never mixes versions; the old engine is freed when the last request
holding it finishes.  A failed load keeps the old version serving, and is logged and
counted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from contracts.manifest import (
    ArtifactError,
    IndexManifest,
    Mismatch,
    TowerExportManifest,
    pair_mismatches,
)
from service.batcher import MicroBatcher
from service.core import RecallEngine
from service.failures import REDIS_ERRORS, RedisBreaker, reason_of
from service.memory import release_free_memory
from service.observability import Metrics
from service.recall_flow import RecallFlow
from service.remote_tower import TowerBackend
from service.sessions import SessionStore
from service.settings import Settings
from service.tower import UserTowerRunner
from service.xhat_warm import (
    WarmProgress,
    XhatRecomputer,
    background_executor,
    record_warm,
    warm_xhat,
)

log = logging.getLogger(__name__)

# How long /readyz waits for a startup warm about to end before answering "warming": less
# than a readiness probe's timeout (deploy/k8s: 2 s), and enough for a warm that finds few
# users to end first (tests, a fresh deployment).
WARM_READY_WAIT_S = 0.5
# After a swap, how long past MAX_BUDGET_MS to wait for the last request holding the old
# engine (a batch already running in its thread), and how often to look.
RELEASE_MARGIN_S = 2.0
RELEASE_POLL_S = 0.02
# When it is still referenced then: how long to look (once a second) before giving up.
RELEASE_FOLLOW_UP_S = 300.0
# How long /readyz waits for Redis's PONG: with the warm wait above, well under the
# readiness probe's 2 s timeout even when Redis is a black hole (a probe that times out
# would take the pod out of the Service, which is what Redis must never do).
REDIS_PING_WAIT_S = 0.5


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` reports.  ``reasons``: why the service cannot answer (no tower, no
    index, a mismatch between them, the startup warm still running); empty when it can.
    Redis is not one of them: without it ``/recall`` still answers (the popular items,
    ``degraded``), so its health is reported beside readiness, never as a reason."""

    reasons: dict[str, str]
    redis: str  # "up" or "down"
    redis_error: str | None = None


def resolve(path: Path) -> str:
    return os.path.realpath(path)


class ServiceState:
    """What the lifespan loaded, and why whatever is missing is missing."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: RecallEngine | None = None
        # Realpaths (artifacts, index) the engine was loaded from.
        self.loaded_paths: tuple[str, str] | None = None
        self.store: SessionStore | None = None
        self.errors: dict[str, str] = {}
        self.batcher: MicroBatcher | None = None
        # What /recall runs: set once the session store and the batcher exist.
        self.recall_flow: RecallFlow | None = None
        self.breaker = RedisBreaker(
            settings.redis_breaker_failures,
            settings.redis_breaker_open_ms / 1000,
            on_outcome=self._redis_outcome,
        )
        self._reload_lock = asyncio.Lock()
        self._last_attempt: tuple[str, str] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # After a swap whose old engine outlived the wait: settles once it is freed.
        self._settle_task: asyncio.Task[None] | None = None
        # Near-line xhat (service/xhat_warm.py): the last warm's progress, the startup warm,
        # the recompute after writes, and their one low-priority thread.
        self.warm: WarmProgress | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self.recomputer: XhatRecomputer | None = None
        self._background = background_executor(settings.xhat_background_nice)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        settings = self.settings
        # AnyIO's default limiter serves FastAPI's sync code and our file loads; inference
        # has its own limiter (the batcher's), so the two never starve each other.
        anyio.to_thread.current_default_thread_limiter().total_tokens = (
            settings.default_thread_limit
        )
        from index_builder.loaded import configure_threads

        configure_threads(settings.faiss_threads)
        paths = (resolve(settings.artifacts_dir), resolve(settings.index_dir))
        self._last_attempt = paths
        # Loading reads and checksums files (seconds for a large model): in a thread.
        engine, errors = await anyio.to_thread.run_sync(self._load_engine, *paths)
        self.errors.update(errors)
        if engine is not None:
            self._install(engine, paths)
            settle_heap()  # nothing is served yet: the one full collection costs nothing
        try:
            self.store = SessionStore.from_settings(settings)
        except Exception as exc:  # e.g. a malformed URL: report it, do not crash
            self.errors["redis"] = reason_of(exc)
            log.error("session store not configured: %s", self.errors["redis"])
        if await self.redis_health() is not None:  # also sets the gauge from the start
            log.warning("Redis unreachable at start: recalls answer degraded until it is back")
        self.batcher = MicroBatcher(
            settings.inference_concurrency,
            settings.max_batch,
            settings.batch_wait_ms / 1000,
            self.metrics,
        )
        self.batcher.start()
        if self.store is not None:
            self.recall_flow = RecallFlow(
                self.store,
                self.batcher,
                self.breaker,
                self.metrics,
                session_max_len=settings.session_max_len,
                default_budget_ms=settings.budget_ms,
            )
        self.metrics.xhat_cache_entries.set_function(self._xhat_entries)
        if self.store is not None:
            if self.engine is not None:
                # In the background: /healthz answers meanwhile, /readyz says "warming".
                self._warm_task = asyncio.create_task(
                    self._warm_at_startup(self.engine, self.store), name="xhat-warm"
                )
            if settings.xhat_recompute_queue > 0:
                self.recomputer = XhatRecomputer(
                    lambda: self.engine,
                    self.store,
                    self._background,
                    self.metrics,
                    max_queue=settings.xhat_recompute_queue,
                    batch_size=settings.xhat_warm_batch,
                    session_max_len=settings.session_max_len,
                    redis_timeout_s=self._redis_call_timeout_s,
                )
                self.recomputer.start()
        if settings.watch_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch_forever(), name="version-watcher")

    async def close(self) -> None:
        for task in (self._watcher, self._warm_task, self._settle_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.recomputer is not None:
            await self.recomputer.close()
        # A diffusion batch already running finishes in its thread; queued ones are dropped.
        self._background.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()  # this app's objects may be collected again (several apps in tests)
        if self.batcher is not None:
            await self.batcher.close()
        if self.store is not None:
            await self.store.close()

    def _redis_outcome(self, ok: bool) -> None:
        self.metrics.redis_up.set(1 if ok else 0)

    async def redis_health(self) -> str | None:
        """None when Redis answers a PING now, else why not; sets the ``t2diff_redis_up``
        gauge either way."""
        if self.store is None:
            error = self.errors.get("redis", "no session store")
        else:
            try:
                await asyncio.wait_for(self.store.ping(), REDIS_PING_WAIT_S)
                error = None
            except REDIS_ERRORS as exc:
                error = f"cannot reach Redis: {reason_of(exc)}"
        self._redis_outcome(error is None)
        return error

    async def readiness(self) -> Readiness:
        """Whether the service can answer now (model and index loaded), and Redis's health
        beside it (not part of readiness: see :class:`Readiness`)."""
        # A session store that could not even be configured (a malformed URL) is a reason:
        # /recall answers 503 without one.  Redis merely unreachable is not.
        reasons = dict(self.errors)
        redis_error = await self.redis_health()
        task = self._warm_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=WARM_READY_WAIT_S)  # never cancels it
            if not task.done() and self.warm is not None:
                reasons["xhat_warm"] = (
                    f"warming the xhat cache: {self.warm.sessions_computed} of "
                    f"{self.warm.users} sessions, for at most "
                    f"{self.settings.xhat_warm_seconds:g}s"
                )
        return Readiness(reasons, "down" if redis_error else "up", redis_error)

    # ------------------------------------------------------------------ near-line xhat

    @property
    def _redis_call_timeout_s(self) -> float:
        # One pipelined read of a batch of sessions: a connect, a retry and some margin.
        settings = self.settings
        return (settings.redis_connect_timeout_ms + 4 * settings.redis_timeout_ms) / 1000

    def _xhat_entries(self) -> float:
        engine = self.engine
        cache = engine.tower.xhat_cache if engine is not None else None
        return float(len(cache)) if cache is not None else 0.0

    async def _warm(
        self,
        engine: RecallEngine,
        store: SessionStore,
        trigger: str,
        executor: ThreadPoolExecutor,
        workers: int,
    ) -> WarmProgress:
        settings = self.settings
        self.warm = progress = WarmProgress(trigger)
        await warm_xhat(
            engine,
            store,
            progress=progress,
            max_users=settings.xhat_warm_users,
            max_seconds=settings.xhat_warm_seconds,
            batch_size=settings.xhat_warm_batch,
            session_max_len=settings.session_max_len,
            executor=executor,
            workers=workers,
            redis_timeout_s=self._redis_call_timeout_s,
        )
        record_warm(self.metrics, progress, engine.model_version)
        return progress

    async def _warm_at_startup(self, engine: RecallEngine, store: SessionStore) -> None:
        # Nothing is served yet: normal priority, by default one thread per usable core (at
        # most INFERENCE_CONCURRENCY: a container may see more cores than it may use).
        settings = self.settings
        workers = settings.xhat_warm_threads or min(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1,
            settings.inference_concurrency,
        )
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xhat-warm")
        try:
            await self._warm(engine, store, "startup", executor, workers)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ loading

    def _load_engine(
        self, artifacts: str, index_dir: str
    ) -> tuple[RecallEngine | None, dict[str, str]]:
        return load_engine(self.settings, artifacts, index_dir)

    # ------------------------------------------------------------------ swapping
    def _install(self, engine: RecallEngine, paths: tuple[str, str]) -> None:
        # One reference assignment: requests that already hold the old engine finish with it.
        self.engine = engine
        self.loaded_paths = paths
        for key in ("tower", "index", "engine"):
            self.errors.pop(key, None)
        self.metrics.set_version(engine.model_version, engine.index_version)

    async def reload(self, trigger: str, force: bool = False) -> dict[str, Any]:
        """Load the version the configured dirs point at now, and swap it in.

        Without ``force`` nothing is loaded when the realpaths are those already served
        (or last tried), or while the two manifests name different model versions (a
        promotion half done).  Returns ``{"status": "unchanged"|"waiting"|"reloaded"|
        "failed", ...}``; on failure the old version keeps serving.
        """
        async with self._reload_lock:
            paths = (resolve(self.settings.artifacts_dir), resolve(self.settings.index_dir))
            if not force and paths in (self.loaded_paths, self._last_attempt):
                return {"status": "unchanged"}
            try:
                mismatches = await anyio.to_thread.run_sync(_manifest_mismatches, *paths)
            except ArtifactError as exc:
                return self._failed(trigger, paths, {"manifest": reason_of(exc)})
            # Only the model versions decide here: differing ones are a promotion half done
            # (wait for the second link).  Any other mismatch fails the load below, with
            # whatever else is wrong with the files.
            versions = [m for m in mismatches if m.field == "model_version"]
            if versions:
                if force:
                    return self._failed(trigger, paths, {"engine": versions[0].reason})
                log.info("promotion in progress: %s", versions[0].reason)
                return {"status": "waiting"}
            self._last_attempt = paths
            started = time.perf_counter()
            engine, errors = await anyio.to_thread.run_sync(self._load_engine, *paths)
            if engine is None:
                return self._failed(trigger, paths, errors)
            if self.store is not None:
                # Before the switch, on the low-priority thread while the old version
                # serves: the new version's first recalls hit like the old one's did.
                await self._warm(engine, self.store, "swap", self._background, 1)
            old = weakref.ref(self.engine) if self.engine is not None else None
            self._install(engine, paths)
            del engine
            # The old ONNX sessions, FAISS index and xhat cache are large: wait until the
            # requests that hold the old engine end, then give its memory back to the OS
            # (and freeze the new version's heap, see settle_heap).
            await self._release(old)
            self.metrics.reloads.labels(trigger, "success").inc()
            assert self.engine is not None
            log.info(
                "now serving model %s index %s (loaded in %.2fs, trigger %s)",
                self.engine.model_version,
                self.engine.index_version,
                time.perf_counter() - started,
                trigger,
                extra={"artifacts": paths[0], "index": paths[1]},
            )
            return {
                "status": "reloaded",
                "model_version": self.engine.model_version,
                "index_version": self.engine.index_version,
            }

    async def _release(self, old: weakref.ref[RecallEngine] | None) -> None:
        """Wait (bounded) until nothing references the swapped-out engine, then settle the
        heap: a collection, ``malloc_trim`` and ``gc.freeze`` (:func:`settle_heap`).

        Requests that got the old engine before the swap finish with it (at most their
        budget, plus a batch already running in its thread); trimming before they end would
        return nothing.  An engine still referenced after the wait is logged: something
        keeps old versions alive (docs/results/service.md, "Memory over hot swaps").
        """
        if old is None:
            await anyio.to_thread.run_sync(settle_heap)
            return
        engine = old()
        version = engine.model_version if engine is not None else None
        del engine
        started = time.monotonic()
        deadline = started + self.settings.max_budget_ms / 1000 + RELEASE_MARGIN_S
        while old() is not None and time.monotonic() < deadline:
            await asyncio.sleep(RELEASE_POLL_S)
        if old() is None:
            log.info("model %s freed %.2fs after the swap", version, time.monotonic() - started)
            await anyio.to_thread.run_sync(settle_heap)
            return
        # Still referenced: freezing now would move whatever holds it (a request's frames in
        # a reference cycle, say) to the permanent generation, where the collector never
        # frees it, and the old version with it.  Collect and trim without freezing; freeze
        # once it is gone.
        log.warning("the swapped-out model %s is still referenced after the swap", version)
        await anyio.to_thread.run_sync(settle_heap, False)
        if self._settle_task is not None:
            self._settle_task.cancel()
        self._settle_task = asyncio.create_task(
            self._settle_when_freed(old, version), name="settle-after-swap"
        )

    async def _settle_when_freed(self, old: weakref.ref[RecallEngine], version: str | None) -> None:
        """Settle the heap (with the freeze) once the old engine is gone; give up after
        RELEASE_FOLLOW_UP_S (the next swap settles again anyway)."""
        deadline = time.monotonic() + RELEASE_FOLLOW_UP_S
        while old() is not None:
            if time.monotonic() > deadline:
                log.warning("the swapped-out model %s is still referenced", version)
                return
            await asyncio.sleep(1.0)
        log.info("model %s freed; heap settled", version)
        await anyio.to_thread.run_sync(settle_heap)

    def _failed(
        self, trigger: str, paths: tuple[str, str], errors: dict[str, str]
    ) -> dict[str, Any]:
        self._last_attempt = paths
        self.metrics.reloads.labels(trigger, "failure").inc()
        log.error(
            "version not loaded, still serving %s: %s",
            self.engine.model_version if self.engine else "nothing",
            errors,
            extra={"artifacts": paths[0], "index": paths[1]},
        )
        return {"status": "failed", "errors": errors}

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                await self.reload("watch")
            except Exception:  # never let the watcher die
                log.exception("version watcher failed")


def load_engine(
    settings: Settings, artifacts: str | Path, index_dir: str | Path
) -> tuple[RecallEngine | None, dict[str, str]]:
    """Load tower + index from these dirs as the service does (its settings: ORT threads,
    xhat cache, tower backend, nprobe), and warm them up with one recall; (engine or None,
    reasons).  ``t2diff rebuild``'s validation loads a candidate through this too
    (``service.release_check``), so that what is promoted is what the service can load.
    """
    errors: dict[str, str] = {}
    tower = index = None
    try:
        tower = UserTowerRunner(
            Path(artifacts),
            settings.ort_intra_threads,
            settings.xhat_cache_size,
            TowerBackend.from_settings(settings),
            settings.ort_cpu_arena,
        )
    except Exception as exc:  # any failure (checksums, ORT, numpy) is a reason
        errors["tower"] = reason_of(exc)
        _log_load_failure(exc, "user tower not loaded from %s", artifacts)
    try:
        # Imported here: loading FAISS is part of loading the index, and a broken FAISS
        # install must surface as a readiness reason.
        from index_builder.loaded import load_index

        index = load_index(Path(index_dir))
    except Exception as exc:
        errors["index"] = reason_of(exc)
        _log_load_failure(exc, "index not loaded from %s", index_dir)
    if tower is None or index is None:
        return None, errors
    try:
        engine = RecallEngine(tower, index, nprobe=settings.nprobe)
        engine.warm_up()
    except Exception as exc:
        errors["engine"] = reason_of(exc)
        log.error("tower and index do not fit together: %s", errors["engine"])
        return None, errors
    return engine, errors


def settle_heap(freeze: bool = True) -> None:
    """Collect garbage once, then freeze what survives (``gc.freeze``): the loaded version's
    objects move to the permanent generation, which the cyclic GC never scans again.

    Why: a full (generation 2) collection of the loaded service's heap took ~50 ms on the
    2-core box, and request churn triggers one every 15-30 s under load; each stalled the
    event loop and every engine thread (the collector holds the GIL), which showed up as
    clusters of 70-120 ms recalls and a Redis write timing out (load.md, run k).  Frozen
    objects are still freed by reference counting (a loaded version holds no reference
    cycle: it is freed without the collector); ``unfreeze`` first lets the collector find
    any cycle of a version that was just swapped out.

    Between the collection and the freeze, ``malloc_trim(0)`` hands the C heap's free pages
    back to the OS: a swap loads the new version beside the old one, so the old one's
    memory (ONNX Runtime's buffers, the FAISS index) is freed in the middle of the heap,
    where glibc keeps it; without the trim RSS grew ~30 MB a swap under traffic.
    """
    gc.unfreeze()
    gc.collect()
    release_free_memory()
    if freeze:
        gc.freeze()


def _manifest_mismatches(artifacts: str, index_dir: str) -> list[Mismatch]:
    # verify=False: only the manifests are compared here; the load verifies the files.
    export = TowerExportManifest.load(Path(artifacts), verify=False)
    index = IndexManifest.load(Path(index_dir), verify=False)
    return pair_mismatches(export, index)


def _log_load_failure(exc: BaseException, message: str, path: object) -> None:
    # An ArtifactError is an expected, fully explained refusal (missing dir, bad checksum):
    # one line.  Anything else is a bug or a broken install: keep the traceback.
    if isinstance(exc, ArtifactError):
        log.error(message + ": %s", path, exc)
    else:
        log.exception(message, path)
