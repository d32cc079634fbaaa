"""Near-line xhat (``service/xhat_warm.py``) with the real parts: a tiny split T2Diff
export in ONNX Runtime, its FAISS index, a real redis-server.

* Warm on load: a service started over existing sessions computes their ``xhat`` before it
  says ready, so the first recall of a warmed user is a hit with the cold answer; the warm
  is bounded by ``XHAT_WARM_USERS`` (the most recently active first) and by
  ``XHAT_WARM_SECONDS``; a Redis that is down or answers errors never stops the service.
* Recompute on write: after ``POST /events`` the user's new ``xhat`` is computed in the
  background, so the next recall hits; the queue is bounded.
* Hot swap: the new version is warmed before it is switched in.
* The activity ZSET the warm reads is kept by ``/events`` and by the bulk loader.

No test asserts a duration: waits are bounded loops on the service's own state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from export_fixtures import deploy_versions, point_current
from fastapi import FastAPI
from fastapi.testclient import TestClient
from service_fixtures import point_link
from test_split_tower import N_ITEMS, _model, export_tiny_t2diff, item_name

from contracts.sessions import active_users_key
from model.data import to_sequences
from service.app import create_app
from service.sessions import load_sessions_from_sequences
from service.settings import Settings
from service.state import ServiceState
from service.tower import UserTowerRunner

TOKEN = "warm-token"
PREFIX = "t2warm"
START = 1_700_000_000.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two split versions (different weights), each with its index."""
    seeds = {"warm-a": 21, "warm-b": 22}
    return deploy_versions(
        tmp_path_factory.mktemp("warm-deploy"),
        lambda out, v: export_tiny_t2diff(out, _model(seeds[v], session_gap_s=3600.0), v),
        tuple(seeds),
    )


@pytest.fixture
def links(deployment: Path) -> Iterator[Path]:
    point_current(deployment, "warm-a")
    yield deployment


def settings_for(root: Path, redis_url: str, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "artifacts_dir": root / "artifacts" / "current",
        "index_dir": root / "indexes" / "current",
        "redis_url": redis_url,
        "redis_prefix": PREFIX,
        "budget_ms": 5_000,
        "watch_interval_s": 0,
        "admin_token": TOKEN,
        "xhat_cache_size": 1000,
        "inference_concurrency": 2,
        "xhat_warm_batch": 4,  # several batches even for a handful of users
        **overrides,
    }
    return Settings(**fields)  # type: ignore[arg-type]


def state_of(client: TestClient) -> ServiceState:
    app = client.app
    assert isinstance(app, FastAPI)
    return app.state.service


def wait_ready(client: TestClient) -> dict:
    """/readyz until 200 (each call waits up to 0.5 s for a warm to end): a bounded loop."""
    for _ in range(200):
        response = client.get("/readyz")
        if response.status_code == 200:
            return response.json()
        assert set(response.json()["reasons"]) == {"xhat_warm"}, response.json()
    raise AssertionError("the service never became ready")


def wait_recomputed(client: TestClient) -> None:
    """Until the background recompute has nothing queued or running (bounded)."""
    recomputer = state_of(client).recomputer
    assert recomputer is not None
    for _ in range(1000):
        if not recomputer.pending:
            return
        time.sleep(0.01)
    raise AssertionError("the background recompute never finished")


def write(client: TestClient, user: str, rows: list[int], start: float) -> None:
    events = [
        {"user_id": user, "item_id": item_name(r), "timestamp": start + 600.0 * i}
        for i, r in enumerate(rows)
    ]
    assert client.post("/events", json={"events": events}).status_code == 200


def recall(client: TestClient, user: str) -> dict:
    response = client.post("/recall", json={"user_id": user, "k": 10})
    assert response.status_code == 200
    body = response.json()
    assert not body["degraded"] and not body["cold_start"], body
    return body


def metric(client: TestClient, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    )
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def xhat_counts(client: TestClient) -> tuple[float, float]:
    return (
        metric(client, "t2diff_xhat_cache_total", result="hit"),
        metric(client, "t2diff_xhat_cache_total", result="miss"),
    )


def same_answer(a: dict, b: dict) -> None:
    assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
    assert np.allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]])
    assert a["model_version"] == b["model_version"]


def seed_users(root: Path, redis_url: str, users: int) -> list[str]:
    """Write ``users`` histories through a service's /events (no warm, no recompute); user
    n's newest event is the newest of all for the highest n.  Returns the ids, oldest
    activity first."""
    names = [f"warm-user-{n}" for n in range(users)]
    rng = np.random.default_rng(9)
    plain = settings_for(root, redis_url, xhat_warm_users=0, xhat_recompute_queue=0)
    with TestClient(create_app(plain)) as client:
        for n, user in enumerate(names):
            write(client, user, rng.integers(0, N_ITEMS, 7).tolist(), START + 10_000.0 * n)
    return names


def cold_answers(root: Path, redis_url: str, users: list[str]) -> dict[str, dict]:
    off = settings_for(root, redis_url, xhat_cache_size=0, xhat_recompute_queue=0)
    with TestClient(create_app(off)) as client:
        return {user: recall(client, user) for user in users}


# --------------------------------------------------------------------------- warm on load


def test_warm_fills_the_cache_and_the_first_recall_hits(links: Path, redis_url: str) -> None:
    users = seed_users(links, redis_url, 6)
    with TestClient(create_app(settings_for(links, redis_url))) as client:
        wait_ready(client)
        assert metric(client, "t2diff_xhat_warm_total", outcome="complete", trigger="startup") == 1
        assert metric(client, "t2diff_xhat_warm_sessions") == 6
        assert metric(client, "t2diff_xhat_cache_entries") == 6
        warmed = {user: recall(client, user) for user in users}
        assert xhat_counts(client) == (6.0, 0.0)  # every first recall hit
        assert all("diffusion" not in body["stages_ms"] for body in warmed.values())
    for user, reference in cold_answers(links, redis_url, users).items():
        same_answer(warmed[user], reference)  # the warmed xhat is exactly the cold one


def test_warm_takes_the_most_recently_active_users_first(links: Path, redis_url: str) -> None:
    users = seed_users(links, redis_url, 6)
    with TestClient(create_app(settings_for(links, redis_url, xhat_warm_users=2))) as client:
        wait_ready(client)
        assert metric(client, "t2diff_xhat_warm_sessions") == 2
        for user in users[-2:]:  # the two newest activities
            recall(client, user)
        assert xhat_counts(client) == (2.0, 0.0)
        recall(client, users[0])
        assert xhat_counts(client) == (2.0, 1.0)


def test_warm_is_bounded_by_time_and_can_be_turned_off(links: Path, redis_url: str) -> None:
    users = seed_users(links, redis_url, 6)
    # A bound already past when the first batch would start (the Redis read alone takes
    # longer than a microsecond): the warm stops, the service serves.
    bounded = settings_for(links, redis_url, xhat_warm_seconds=1e-6)
    with TestClient(create_app(bounded)) as client:
        wait_ready(client)
        assert metric(client, "t2diff_xhat_warm_total", outcome="time_bound", trigger="startup")
        assert metric(client, "t2diff_xhat_warm_sessions") < len(users)
        recall(client, users[0])
    for off in ({"xhat_warm_users": 0}, {"xhat_warm_seconds": 0}):
        with TestClient(create_app(settings_for(links, redis_url, **off))) as client:
            wait_ready(client)
            assert metric(client, "t2diff_xhat_warm_total", outcome="off", trigger="startup") == 1
            recall(client, users[0])
            assert xhat_counts(client) == (0.0, 1.0)


def test_warm_falls_back_to_scanning_the_sessions(links: Path, redis_url: str) -> None:
    """Sessions written before the activity ZSET existed are still warmed."""
    users = seed_users(links, redis_url, 3)
    client_redis = redis.Redis.from_url(redis_url)
    client_redis.delete(active_users_key(PREFIX))
    client_redis.close()
    with TestClient(create_app(settings_for(links, redis_url))) as client:
        wait_ready(client)
        assert metric(client, "t2diff_xhat_warm_sessions") == 3
        for user in users:
            recall(client, user)
        assert xhat_counts(client) == (3.0, 0.0)


def test_a_warm_that_fails_never_stops_serving(
    links: Path, redis_url: str, closed_redis_url: str
) -> None:
    # Redis down at startup: the service starts, the failed warm does not hold readiness
    # back (ready: it can answer; Redis's state is a field), answers degraded, and counts
    # the failed warm.
    with TestClient(create_app(settings_for(links, closed_redis_url))) as client:
        assert client.get("/healthz").status_code == 200
        ready = wait_ready(client)
        assert ready["redis"] == "down", ready
        assert metric(client, "t2diff_xhat_warm_total", outcome="failed", trigger="startup") == 1
        body = client.post("/recall", json={"user_id": "anyone", "k": 5}).json()
        assert body["degraded"] and len(body["items"]) == 5
    # Redis up but the activity key is not a ZSET (the read errors): warm fails, the
    # service is ready and serves full answers, cold.
    users = seed_users(links, redis_url, 2)
    client_redis = redis.Redis.from_url(redis_url)
    client_redis.delete(active_users_key(PREFIX))
    client_redis.set(active_users_key(PREFIX), "not a zset")
    client_redis.close()
    with TestClient(create_app(settings_for(links, redis_url))) as client:
        wait_ready(client)
        assert metric(client, "t2diff_xhat_warm_total", outcome="failed", trigger="startup") == 1
        recall(client, users[0])
        assert xhat_counts(client) == (0.0, 1.0)


# --------------------------------------------------------------------------- recompute on write


def test_an_event_write_is_recomputed_in_the_background(links: Path, redis_url: str) -> None:
    user = "writer"
    with TestClient(create_app(settings_for(links, redis_url, xhat_warm_users=0))) as client:
        wait_ready(client)
        write(client, user, [3, 14, 15, 9], START)
        wait_recomputed(client)
        first = recall(client, user)
        assert xhat_counts(client) == (1.0, 0.0)
        write(client, user, [26], START + 100_000.0)  # a new behaviour: a new key
        wait_recomputed(client)
        second = recall(client, user)
        assert xhat_counts(client) == (2.0, 0.0)
        assert metric(client, "t2diff_xhat_recompute_total", result="computed") == 2
        # The same event again is a duplicate: nothing written, nothing queued.
        assert client.post("/events", json={"user_id": user, "item_id": item_name(1),
                                            "event_id": "e1"}).json()["written"] == 1  # fmt: skip
        wait_recomputed(client)
        assert client.post("/events", json={"user_id": user, "item_id": item_name(1),
                                            "event_id": "e1"}).json()["written"] == 0  # fmt: skip
        wait_recomputed(client)
        assert metric(client, "t2diff_xhat_recompute_total", result="computed") == 3
    assert [i["score"] for i in first["items"]] != [i["score"] for i in second["items"]]
    # The recomputed xhat is exactly what a cold recall computes.
    write_free = cold_answers(links, redis_url, [user])
    with TestClient(create_app(settings_for(links, redis_url))) as client:
        wait_ready(client)
        same_answer(recall(client, user), write_free[user])


def test_the_recompute_queue_is_bounded(links: Path, redis_url: str) -> None:
    settings = settings_for(links, redis_url, xhat_warm_users=0, xhat_recompute_queue=2)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        recomputer = state_of(client).recomputer
        assert recomputer is not None
        # On the event loop in one go: the worker cannot take anything in between.
        client.portal.call(recomputer.submit, ["q1", "q2", "q1", "q3", "q4"])
        assert metric(client, "t2diff_xhat_recompute_total", result="dropped") == 2
        wait_recomputed(client)
        # Users without a session: nothing computed.
        assert metric(client, "t2diff_xhat_recompute_total", result="unchanged") == 2


# --------------------------------------------------------------------------- hot swap


def test_a_hot_swap_warms_the_new_version_before_switching(links: Path, redis_url: str) -> None:
    users = seed_users(links, redis_url, 4)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    settings = settings_for(links, redis_url, xhat_recompute_queue=0)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert recall(client, users[0])["model_version"] == "warm-a"
        for kind in ("indexes", "artifacts"):
            point_link(links / kind / "current", "warm-b")
        assert client.post("/admin/reload", headers=auth).json()["status"] == "reloaded"
        assert metric(client, "t2diff_xhat_warm_total", outcome="complete", trigger="swap") == 1
        on_b = {user: recall(client, user) for user in users}
        assert all(body["model_version"] == "warm-b" for body in on_b.values())
        # Version a's startup warm: 1 hit; version b's first recalls: all hits.
        assert xhat_counts(client) == (1.0 + len(users), 0.0)
    for user, reference in cold_answers(links, redis_url, users).items():
        same_answer(on_b[user], reference)


# --------------------------------------------------------------------------- parts


def test_fill_xhat_computes_each_missing_key_once(links: Path) -> None:
    runner = UserTowerRunner(links / "artifacts" / "warm-a", xhat_cache_size=100)
    tokens = [[1, 2, 3], [4, 5], [1, 2, 3], [6]]
    assert runner.fill_xhat(tokens, batch_size=2, deadline=0.0) == 0  # deadline past
    assert runner.fill_xhat(tokens, batch_size=2) == 3  # [1, 2, 3] once
    assert runner.fill_xhat(tokens, batch_size=2) == 0  # all cached now
    counts: dict[str, int] = {}
    runner.embed_tokens(tokens, [[1.0] * len(t) for t in tokens], 10.0, None, counts)
    assert counts == {"xhat_hit": 4, "xhat_miss": 0}
    assert UserTowerRunner(links / "artifacts" / "warm-a").fill_xhat(tokens) == 0  # no cache


def test_the_activity_zset_is_kept_by_events_and_the_bulk_loader(
    links: Path, redis_url: str
) -> None:
    seed_users(links, redis_url, 2)
    client_redis = redis.Redis.from_url(redis_url)
    key = active_users_key(PREFIX)
    newest = START + 600.0 * 6
    assert client_redis.zrange(key, 0, -1, withscores=True) == [
        (b"warm-user-0", newest),
        (b"warm-user-1", newest + 10_000.0),
    ]
    # A late event with an older timestamp never lowers the score (ZADD GT).
    plain = settings_for(links, redis_url, xhat_warm_users=0, xhat_recompute_queue=0)
    with TestClient(create_app(plain)) as client:
        write(client, "warm-user-1", [5], START)
    assert client_redis.zscore(key, "warm-user-1") == newest + 10_000.0
    client_redis.flushall()
    frame = pd.DataFrame(
        {
            "user_id": ["alice"] * 3 + ["bob"] * 3,
            "item_id": ["i1", "i2", "i3", "i4", "i5", "i6"],
            "timestamp": [10.0, 11.0, 12.0, 50.0, 51.0, 52.0],
        }
    )
    load_sessions_from_sequences(redis_url, to_sequences(frame, min_length=3), prefix=PREFIX)
    assert client_redis.zrevrange(key, 0, -1, withscores=True) == [(b"bob", 52.0), (b"alice", 12.0)]
    client_redis.close()


def test_the_loaded_heap_is_frozen(links: Path, redis_url: str) -> None:
    """After loading, the version's objects sit in the GC's permanent generation (no full
    collection scans them under load: service.state.settle_heap); closing the app thaws
    them so that another app in the same process can collect them."""
    import gc

    with TestClient(create_app(settings_for(links, redis_url, xhat_warm_users=0))) as client:
        wait_ready(client)
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
