"""Sessions in a real Redis: layout, cap, malformed data, bulk loading, failure speed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pandas as pd
import pytest
import redis
from redis.exceptions import RedisError

from contracts.sessions import Session, encode_event, session_key
from model.data import to_sequences
from service.sessions import NewEvent, SessionStore, load_sessions_from_sequences

T = TypeVar("T")
PREFIX = "t2test"


def with_store(redis_url: str, body: Callable[[SessionStore], Awaitable[T]], **kwargs) -> T:
    """Run ``body(store)`` on a fresh event loop with a store created inside it (as the app's
    lifespan does) and closed afterwards."""

    async def main() -> T:
        store = SessionStore(redis_url, prefix=PREFIX, **kwargs)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def new_events(user_id: str, events: list[tuple[str, float]]) -> list[NewEvent]:
    return [NewEvent(user_id, item_id, timestamp) for item_id, timestamp in events]


def raw_list(redis_url: str, user_id: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return client.lrange(session_key(user_id, PREFIX), 0, -1)
    finally:
        client.close()


def test_append_and_read_round_trip(redis_url: str) -> None:
    events = [("item-1", 1_700_000_000.25), ("sku|7", 1_700_000_001.5), ("item-1", 1_700_000_002.0)]

    async def body(store: SessionStore) -> list[Session]:
        # The service's write path (POST /events), in two calls.
        await store.append_events(new_events("u1", events[:2]), max_len=10, dedup_ttl_s=60)
        await store.append_events(new_events("u1", events[2:]), max_len=10, dedup_ttl_s=60)
        return await store.get_sessions(["u1", "nobody", "u1"], max_len=10)

    u1, nobody, again = with_store(redis_url, body)
    assert u1.item_ids == ["item-1", "sku|7", "item-1"]  # oldest first, '|' inside an id kept
    assert u1.timestamps == [ts for _, ts in events]  # repr round-trips floats exactly
    assert u1.malformed == 0
    assert len(nobody) == 0 and again == u1  # pipelined answers keep the request order
    # The documented layout: LIST at {prefix}:session:{user}, elements "{ts!r}|{item}".
    assert raw_list(redis_url, "u1") == [encode_event(i, t).encode() for i, t in events]


def test_cap_keeps_newest(redis_url: str) -> None:
    async def body(store: SessionStore) -> tuple[Session, Session]:
        for start in range(0, 12, 4):
            batch = [(f"item-{n}", float(n)) for n in range(start, start + 4)]
            await store.append_events(new_events("u", batch), max_len=5, dedup_ttl_s=60)
        full = (await store.get_sessions(["u"], max_len=100))[0]
        newest = (await store.get_sessions(["u"], max_len=3))[0]
        return full, newest

    full, newest = with_store(redis_url, body)
    assert full.item_ids == [f"item-{n}" for n in range(7, 12)]
    assert newest.item_ids == ["item-9", "item-10", "item-11"]
    assert len(raw_list(redis_url, "u")) == 5


def test_malformed_elements_are_skipped(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.rpush(
        session_key("u", PREFIX),
        encode_event("good-1", 10.0),
        "no separator",
        "abc|item",  # timestamp not a number
        "12.0|",  # empty item id
        "nan|item",  # not finite
        "inf|item",
        f"13.0|{'x' * 129}",  # id longer than the contract allows
        b"\xff\xfe|bad-bytes",  # undecodable timestamp
        encode_event("good-2", 14.0),
    )
    client.close()

    async def body(store: SessionStore) -> Session:
        return (await store.get_sessions(["u"], max_len=100))[0]

    session = with_store(redis_url, body)
    assert session.item_ids == ["good-1", "good-2"]
    assert session.timestamps == [10.0, 14.0]
    assert session.malformed == 7


def small_sequences() -> pd.DataFrame:
    rows = [("alice", f"i{n}", 100.0 + n) for n in range(6)]
    rows += [("bob", "i2", 50.0), ("bob", "i|x", 51.5), ("bob", "i0", 52.0)]
    rows += [("carol", "i5", 7.0)]  # below min_length: dropped by to_sequences
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def test_bulk_loader_writes_newest_behaviours(redis_url: str) -> None:
    data = to_sequences(small_sequences(), min_length=3)
    # A stale list that replace=True must wipe.
    client = redis.Redis.from_url(redis_url)
    client.rpush(session_key("alice", PREFIX), encode_event("stale", 1.0))
    client.close()

    users = load_sessions_from_sequences(
        redis_url, data, prefix=PREFIX, max_len=4, batch_users=1, replace=True
    )
    assert users == 2

    async def body(store: SessionStore) -> list[Session]:
        return await store.get_sessions(["alice", "bob", "carol"], max_len=100)

    alice, bob, carol = with_store(redis_url, body)
    assert alice.item_ids == ["i2", "i3", "i4", "i5"]
    assert alice.timestamps == [102.0, 103.0, 104.0, 105.0]
    assert bob.item_ids == ["i2", "i|x", "i0"] and bob.timestamps == [50.0, 51.5, 52.0]
    assert len(carol) == 0


def test_bulk_loader_append_mode_caps(redis_url: str) -> None:
    data = to_sequences(small_sequences(), min_length=3)
    load_sessions_from_sequences(redis_url, data, prefix=PREFIX, max_len=4)
    load_sessions_from_sequences(redis_url, data, prefix=PREFIX, max_len=4, replace=False)
    assert len(raw_list(redis_url, "alice")) == 4
    # bob: 3 + 3 appended, capped to the newest 4.
    bob = [e.decode().partition("|")[2] for e in raw_list(redis_url, "bob")]
    assert bob == ["i0", "i2", "i|x", "i0"]


def test_unreachable_redis_fails_fast(closed_redis_url: str) -> None:
    async def body(store: SessionStore) -> None:
        started = time.perf_counter()
        with pytest.raises(RedisError):
            await store.get_sessions(["u"], max_len=10)
        with pytest.raises(RedisError):
            await store.ping()
        # Refused connections with one retry: far below redis-py's default timeouts.
        assert time.perf_counter() - started < 2.0

    with_store(closed_redis_url, body)
