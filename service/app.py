"""The HTTP face of the recall service (FastAPI).

Routes stay thin: validate, read the session from Redis, hand the rest to
:class:`service.core.RecallEngine` in a worker thread.  Everything heavy (ONNX session, FAISS
index, Redis pool) is created in the lifespan, never at import, and a failure to load is
kept as a reason that ``/readyz`` reports instead of crashing the process: an orchestrator
then sees an unready pod with an explanation rather than a crash loop.
"""

# No ``from __future__ import annotations``: the request model is built per app (its k bound
# comes from the settings) and FastAPI must resolve route annotations to the real class.

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from contracts.manifest import ArtifactError
from service.core import RecallEngine, RecallRequest, RecallResult
from service.sessions import SessionStore
from service.settings import Settings
from service.tower import UserTowerRunner

log = logging.getLogger(__name__)

# What a failing Redis call can raise: redis-py wraps most socket errors, but not all.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class RecallItemOut(BaseModel):
    item_id: str
    score: float


class RecallResponse(BaseModel):
    user_id: str
    items: list[RecallItemOut]
    model_version: str
    index_version: str
    latency_ms: float
    cold_start: bool


def make_request_model(default_k: int, max_k: int) -> type[BaseModel]:
    """The ``POST /recall`` body, bounded by this app's settings."""

    class RecallBody(BaseModel):
        # strict: "5" is not a k and "yes" is not a bool; forbid: a misspelt field
        # ("exclude_seem") is an error, not a silently ignored option.
        model_config = ConfigDict(strict=True, extra="forbid")

        user_id: Annotated[str, Field(min_length=1, max_length=128)]
        k: Annotated[int, Field(ge=1, le=max_k)] = default_k
        exclude_seen: bool = True

    return RecallBody


class ServiceState:
    """What the lifespan loaded, and why whatever is missing is missing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: RecallEngine | None = None
        self.store: SessionStore | None = None
        self.errors: dict[str, str] = {}
        self.limiter: anyio.CapacityLimiter | None = None

    async def start(self) -> None:
        settings = self.settings
        self.limiter = anyio.CapacityLimiter(settings.inference_concurrency)
        # Loading reads and checksums files and may take seconds for a large model: done in
        # a thread, so the same code can later load a new version while the loop serves.
        self.engine = await anyio.to_thread.run_sync(self._load_engine)
        try:
            self.store = SessionStore.from_settings(settings)
        except Exception as exc:  # e.g. a malformed URL: report it, do not crash
            self.errors["redis"] = _reason(exc)
            log.error("session store not configured: %s", self.errors["redis"])

    def _load_engine(self) -> RecallEngine | None:
        # Imported here, not at module level: loading FAISS is part of loading the index,
        # and a broken FAISS install must surface as a readiness reason.
        settings = self.settings
        tower = index = None
        try:
            tower = UserTowerRunner(settings.artifacts_dir, settings.ort_intra_threads)
        except Exception as exc:  # any failure (checksums, ORT, numpy) is a reason
            self.errors["tower"] = _reason(exc)
            _log_load_failure(exc, "user tower not loaded from %s", settings.artifacts_dir)
        try:
            from index_builder.loaded import configure_threads, load_index

            configure_threads(settings.faiss_threads)
            index = load_index(settings.index_dir)
        except Exception as exc:
            self.errors["index"] = _reason(exc)
            _log_load_failure(exc, "index not loaded from %s", settings.index_dir)
        if tower is None or index is None:
            return None
        try:
            return RecallEngine(tower, index, nprobe=settings.nprobe)
        except Exception as exc:
            self.errors["engine"] = _reason(exc)
            log.error("tower and index do not fit together: %s", self.errors["engine"])
            return None

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    async def readiness(self) -> dict[str, str]:
        """Reasons the service cannot answer now; empty when ready."""
        reasons = dict(self.errors)
        if self.store is not None:
            try:
                await self.store.ping()
            except REDIS_ERRORS as exc:
                reasons["redis"] = f"cannot reach Redis: {_reason(exc)}"
        return reasons


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _log_load_failure(exc: BaseException, message: str, path: object) -> None:
    # An ArtifactError is an expected, fully explained refusal (missing dir, bad checksum):
    # one line.  Anything else is a bug or a broken install: keep the traceback.
    if isinstance(exc, ArtifactError):
        log.error(message + ": %s", path, exc)
    else:
        log.exception(message, path)


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings)
        app.state.service = state
        await state.start()
        if state.errors:
            log.error("service starting NOT ready: %s", state.errors)
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="T2Diff recall", version="0.1.0", lifespan=lifespan)
    RecallBody = make_request_model(settings.default_k, settings.max_k)  # noqa: N806

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Liveness only: the process runs its event loop.  Readiness is /readyz.
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        state = _state(request)
        reasons = await state.readiness()
        if reasons:
            return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
        assert state.engine is not None
        return JSONResponse(
            {
                "status": "ready",
                "model_version": state.engine.model_version,
                "index_version": state.engine.index_version,
            }
        )

    @app.post("/recall", response_model=RecallResponse)
    async def recall(body: RecallBody, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        started = time.perf_counter()
        state = _state(request)
        if state.engine is None or state.store is None or state.limiter is None:
            raise HTTPException(503, detail={"reason": "not ready", "errors": state.errors})
        engine, store = state.engine, state.store
        try:
            (session,) = await store.get_sessions([body.user_id], settings.session_max_len)
        except REDIS_ERRORS as exc:
            # For now an unreachable session store fails the request; serving a degraded
            # answer (cold start) instead is a later, deliberate change.
            raise HTTPException(503, detail=f"session store unavailable: {_reason(exc)}") from exc
        recall_request = RecallRequest(body.user_id, body.k, body.exclude_seen)
        # ORT and FAISS release the GIL but block: run them in a worker thread, at most
        # inference_concurrency at a time.
        (result,) = await anyio.to_thread.run_sync(
            engine.recall_batch,
            [recall_request],
            [session],
            time.time(),
            limiter=state.limiter,
        )
        return _response(result, (time.perf_counter() - started) * 1000)

    return app


def _response(result: RecallResult, latency_ms: float) -> dict[str, Any]:
    return {
        "user_id": result.user_id,
        "items": [{"item_id": item.item_id, "score": item.score} for item in result.items],
        "model_version": result.model_version,
        "index_version": result.index_version,
        "latency_ms": round(latency_ms, 3),
        "cold_start": result.cold_start,
    }
