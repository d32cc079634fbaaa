"""``POST /events``: one event or a batch, appended to the users' sessions in Redis."""

# No ``from __future__ import annotations``: the body model is built per app and FastAPI
# must resolve the route's annotations to real classes.

import asyncio
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from service.failures import REDIS_ERRORS, reason_of
from service.routes.deps import LogFieldsDep, MetricsDep, SettingsDep, StateDep, unavailable
from service.routes.models import EventsResponse
from service.sessions import NewEvent


def events_router(events_body: type[BaseModel]) -> APIRouter:
    """The route for this app's body model (its bounds come from the app's settings)."""
    router = APIRouter()

    @router.post(
        "/events",
        response_model=EventsResponse,
        responses={503: {"description": "Redis unavailable or overloaded; retry"}},
    )
    async def events(
        body: events_body,  # type: ignore[valid-type]
        state: StateDep,
        settings: SettingsDep,
        metrics: MetricsDep,
        log_fields: LogFieldsDep,
    ) -> dict[str, int]:
        store = state.store
        if store is None:
            raise unavailable({"reason": "not ready", "errors": state.errors}, 1)
        now = time.time()
        new = [
            NewEvent(
                e.user_id,
                e.item_id,
                now if e.timestamp is None else float(e.timestamp),
                e.event_id,
            )
            for e in events_of(body)
        ]
        if not state.breaker.allow():
            raise unavailable("session store unavailable (circuit open)", settings.retry_after_s)
        timeout = (settings.redis_connect_timeout_ms + 4 * settings.redis_timeout_ms) / 1000
        try:
            written, duplicates = await asyncio.wait_for(
                store.append_events(new, settings.session_max_len, settings.event_dedup_ttl_s),
                timeout,
            )
            state.breaker.success()
        except (TimeoutError, *REDIS_ERRORS) as exc:
            state.breaker.failure()
            kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            metrics.redis_errors.labels("write", kind).inc()
            # The outcome is unknown (a timed-out script may have run): a retry with the
            # same event ids is safe, which is what event ids are for.
            raise unavailable(
                f"session store unavailable: {reason_of(exc)}", settings.retry_after_s
            ) from exc
        metrics.events.labels("written").inc(written)
        metrics.events.labels("duplicate").inc(duplicates)
        if written and state.recomputer is not None:
            # The users' sessions changed: compute their new xhat before they next recall.
            state.recomputer.submit(dict.fromkeys(e.user_id for e in new))
        log_fields.update(events=len(new), written=written, duplicates=duplicates)
        return {"written": written, "duplicates": duplicates}

    return router


def events_of(body: Any) -> list[Any]:
    """The events of a single-or-batch body; 422 naming the field when it is neither."""
    single = (body.user_id, body.item_id, body.timestamp, body.event_id)
    if body.events is not None:
        if any(v is not None for v in single):
            raise _field_error("events", "give either 'events' or one event's fields, not both")
        return list(body.events)
    for name in ("user_id", "item_id"):
        if getattr(body, name) is None:
            raise _field_error(name, "field required (or give 'events')")
    return [body]


def _field_error(field: str, message: str) -> HTTPException:
    return HTTPException(
        422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}]
    )
