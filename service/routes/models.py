"""Request and response bodies of the HTTP API.

The request bodies are built per app (:func:`make_request_models`): their bounds (``k``,
``budget_ms``, events per request) come from that app's settings.
"""

# No ``from __future__ import annotations``: pydantic and FastAPI resolve these annotations
# to real classes, and the per-app models close over the settings.

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from contracts.sessions import MAX_ID_LENGTH
from service.settings import Settings

# Ids: 1..128 characters, no control characters (they would corrupt logs and keys).
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
# Unix seconds: 0 to 2100-01-01.
MAX_TIMESTAMP = 4_102_444_800.0
DEADLINE_HEADER = "X-Request-Deadline-Ms"


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
    degraded: bool = False
    degraded_reason: str | None = None
    # Milliseconds per stage this request went through: redis, queue, tower, ann, filter
    # (the last three are its batch's).
    stages_ms: dict[str, float] = Field(default_factory=dict)


class EventsResponse(BaseModel):
    written: int
    duplicates: int


def make_request_models(settings: Settings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The ``POST /recall`` and ``POST /events`` bodies, bounded by this app's settings."""

    class RecallBody(BaseModel):
        # strict: "5" is not a k and "yes" is not a bool; forbid: a misspelt field
        # ("exclude_seem") is an error, not a silently ignored option.
        model_config = ConfigDict(strict=True, extra="forbid")

        user_id: Id
        k: Annotated[int, Field(ge=1, le=settings.max_k)] = settings.default_k
        exclude_seen: bool = True
        budget_ms: Annotated[int, Field(ge=1, le=settings.max_budget_ms)] | None = None

    class EventIn(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        user_id: Id
        item_id: Id
        timestamp: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)] | None = (
            None
        )
        event_id: Id | None = None

    class EventsBody(BaseModel):
        """One event, or ``{"events": [...]}``."""

        model_config = ConfigDict(strict=True, extra="forbid")

        events: (
            Annotated[
                list[EventIn], Field(min_length=1, max_length=settings.max_events_per_request)
            ]
            | None
        ) = None
        user_id: Id | None = None
        item_id: Id | None = None
        timestamp: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)] | None = (
            None
        )
        event_id: Id | None = None

    return RecallBody, EventsBody
