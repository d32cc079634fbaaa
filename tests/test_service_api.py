"""The service's contract beyond /recall's happy path: writes (POST /events), bounds and
413/422, the deadline header, metrics, request ids, JSON logs, admin auth, CORS and the
micro-batcher.  Real Redis, real ONNX Runtime and FAISS over the tiny export."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from service_fixtures import TINY_MODEL_VERSION, build_version, item_id

from contracts.sessions import event_key, session_key
from service.app import create_app
from service.observability import JsonFormatter, RequestIdFilter, request_id_var
from service.settings import Settings

PREFIX = "t2api"
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("api")
    return build_version(root, TINY_MODEL_VERSION, index_version="idx-api")


def settings_for(version: tuple[Path, Path], redis_url: str, **overrides) -> Settings:
    values = {
        "artifacts_dir": version[0],
        "index_dir": version[1],
        "redis_url": redis_url,
        "redis_prefix": PREFIX,
        "max_k": 50,
        "default_k": 10,
        "redis_timeout_ms": 1000,
        "redis_pool_timeout_ms": 1000,
        "budget_ms": 5000,
        "watch_interval_s": 0,
        "session_max_len": 5,
        "max_events_per_request": 8,
        "max_body_bytes": 4096,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(version: tuple[Path, Path], redis_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(version, redis_url, admin_token=TOKEN))) as c:
        yield c


def raw_session(redis_url: str, user_id: str) -> list[str]:
    r = redis.Redis.from_url(redis_url)
    try:
        return [v.decode() for v in r.lrange(session_key(user_id, PREFIX), 0, -1)]
    finally:
        r.close()


def redis_keys(redis_url: str) -> list[bytes]:
    r = redis.Redis.from_url(redis_url)
    try:
        return r.keys("*")
    finally:
        r.close()


# --------------------------------------------------------------------------- events


def test_single_event_is_appended_and_used_by_recall(client: TestClient, redis_url: str):
    assert client.post("/recall", json={"user_id": "w1"}).json()["cold_start"] is True
    response = client.post(
        "/events", json={"user_id": "w1", "item_id": item_id(3), "timestamp": 1_700_000_000.5}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"written": 1, "duplicates": 0}
    assert raw_session(redis_url, "w1") == [f"1700000000.5|{item_id(3)}"]
    body = client.post("/recall", json={"user_id": "w1", "k": 5}).json()
    assert body["cold_start"] is False and body["degraded"] is False
    assert item_id(3) not in [i["item_id"] for i in body["items"]]


def test_batch_events_keep_order_cap_and_default_time(client: TestClient, redis_url: str):
    events = [{"user_id": "w2", "item_id": item_id(n), "timestamp": float(n)} for n in range(7)]
    events.insert(3, {"user_id": "other", "item_id": "not-in-the-model"})  # no timestamp
    response = client.post("/events", json={"events": events})
    assert response.json() == {"written": 8, "duplicates": 0}
    # Capped at session_max_len=5, newest kept, in arrival order.
    assert raw_session(redis_url, "w2") == [f"{float(n)!r}|{item_id(n)}" for n in range(2, 7)]
    (other,) = raw_session(redis_url, "other")
    stamp, _, item = other.partition("|")
    assert item == "not-in-the-model" and float(stamp) > 1_600_000_000  # server time
    # An unknown item is kept in Redis and ignored by the tower: still a cold start.
    assert client.post("/recall", json={"user_id": "other"}).json()["cold_start"] is True


def test_events_are_idempotent_on_event_id(client: TestClient, redis_url: str) -> None:
    batch = {
        "events": [
            {"user_id": "w3", "item_id": item_id(1), "event_id": "e-1"},
            {"user_id": "w3", "item_id": item_id(2), "event_id": "e-2"},
            {"user_id": "w3", "item_id": item_id(2), "event_id": "e-2"},  # repeated inside
            {"user_id": "w3", "item_id": item_id(4)},  # no id: always appended
        ]
    }
    assert client.post("/events", json=batch).json() == {"written": 3, "duplicates": 1}
    # The client retries the whole batch: only the id-less event is appended again.
    assert client.post("/events", json=batch).json() == {"written": 1, "duplicates": 3}
    items = [v.partition("|")[2] for v in raw_session(redis_url, "w3")]
    assert items == [item_id(1), item_id(2), item_id(4), item_id(4)]
    r = redis.Redis.from_url(redis_url)
    try:
        ttl = r.ttl(event_key("w3", "e-1", PREFIX))
    finally:
        r.close()
    assert 0 < ttl <= 86_400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u", "item_id": ""}, "item_id"),
        ({"user_id": "u", "item_id": "x" * 129}, "item_id"),
        ({"user_id": "u\n", "item_id": "i"}, "user_id"),
        ({"user_id": "u", "item_id": "i", "timestamp": -1.0}, "timestamp"),
        ({"user_id": "u", "item_id": "i", "timestamp": "now"}, "timestamp"),
        ({"user_id": "u", "item_id": "i", "timestamp": 1e20}, "timestamp"),
        ({"user_id": "u", "item_id": "i", "event_id": "e" * 129}, "event_id"),
        ({"user_id": "u"}, "item_id"),
        ({"events": []}, "events"),
        ({"events": [{"user_id": "u", "item_id": "i"}] * 9}, "events"),
        ({"events": [{"user_id": "u", "item_id": "i"}, {"user_id": "u"}]}, "item_id"),
        ({"events": [{"user_id": "u", "item_id": "i"}], "user_id": "u"}, "events"),
        ({"user_id": "u", "item_id": "i", "colour": "red"}, "colour"),
    ],
)
def test_bad_events_are_422_and_write_nothing(
    client: TestClient, redis_url: str, body: dict, field: str
) -> None:
    response = client.post("/events", json=body)
    assert response.status_code == 422, response.text
    assert any(e["loc"][-1] == field for e in response.json()["detail"]), response.json()
    assert redis_keys(redis_url) == []


def test_body_over_the_limit_is_413_and_writes_nothing(client: TestClient, redis_url: str):
    # Valid JSON, valid events, but over max_body_bytes=4096 (white space counts).
    padded = json.dumps({"events": [{"user_id": "u", "item_id": "i"}]}) + " " * 5000
    response = client.post("/events", content=padded, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert redis_keys(redis_url) == []
    # Without a Content-Length (streamed), the limit still holds.
    chunks = iter([b'{"user_id": "u", "item_id": "', b"i" * 5000, b'"}'])
    streamed = client.post("/events", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert redis_keys(redis_url) == []


# --------------------------------------------------------------------------- recall bounds


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "a", "budget_ms": 0}, "budget_ms"),
        ({"user_id": "a", "budget_ms": 5001}, "budget_ms"),
        ({"user_id": "a", "budget_ms": "10"}, "budget_ms"),
        ({"user_id": "a\x00"}, "user_id"),
    ],
)
def test_recall_bounds(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/recall", json=body)
    assert response.status_code == 422
    assert any(e["loc"][-1] == field for e in response.json()["detail"])


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "1e9"])
def test_bad_deadline_header_is_422(client: TestClient, value: str) -> None:
    response = client.post(
        "/recall", json={"user_id": "a"}, headers={"X-Request-Deadline-Ms": value}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "x-request-deadline-ms"]


def test_exhausted_deadline_answers_the_fallback(client: TestClient, redis_url: str) -> None:
    client.post("/events", json={"user_id": "d", "item_id": item_id(5)})
    response = client.post(
        "/recall", json={"user_id": "d", "k": 5}, headers={"X-Request-Deadline-Ms": "0"}
    )
    body = response.json()
    assert response.status_code == 200
    assert body["degraded"] is True and body["degraded_reason"] == "deadline_exhausted"
    assert len(body["items"]) == 5
    # A normal request is not degraded and reports its stage timings.
    full = client.post(
        "/recall", json={"user_id": "d", "k": 5}, headers={"X-Request-Deadline-Ms": "5000"}
    ).json()
    assert full["degraded"] is False and full["degraded_reason"] is None
    assert {"redis", "queue", "tower", "ann", "filter"} <= set(full["stages_ms"])


# --------------------------------------------------------------------------- observability


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert made.headers["x-request-id"] != "bad id\twith spaces"
    assert len(made.headers["x-request-id"]) == 32


def test_metrics_endpoint(client: TestClient) -> None:
    client.post("/recall", json={"user_id": "m"})
    client.post("/recall", json={"user_id": "m", "k": 0})
    client.post("/recall", json={"user_id": "m"}, headers={"X-Request-Deadline-Ms": "0"})
    text = client.get("/metrics").text
    assert 't2diff_requests_total{endpoint="/recall",method="POST",status="200"} 2.0' in text
    assert 't2diff_requests_total{endpoint="/recall",method="POST",status="422"} 1.0' in text
    assert 't2diff_degraded_total{reason="deadline_exhausted"} 1.0' in text
    assert "t2diff_cold_start_total 1.0" in text
    assert 't2diff_stage_latency_seconds_count{stage="redis"} 1.0' in text
    assert f'index_version="idx-api",model_version="{TINY_MODEL_VERSION}"}} 1.0' in text
    for name in ("t2diff_request_latency_seconds_bucket", "t2diff_batch_size", "t2diff_shed_total"):
        assert name in text


def test_json_log_lines_carry_the_request_id() -> None:
    formatter, request_filter = JsonFormatter(), RequestIdFilter()
    token = request_id_var.set("rid-1")
    try:
        record = logging.LogRecord("service.access", logging.INFO, "", 0, "request", None, None)
        record.status = 200
        request_filter.filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(formatter.format(record))
    assert line["request_id"] == "rid-1" and line["status"] == 200
    assert line["msg"] == "request" and line["level"] == "info"


def test_access_log_fields(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        client.post("/recall", json={"user_id": "log-me"}, headers={"X-Request-ID": "r-42"})
    (record,) = [r for r in caplog.records if r.name == "service.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["endpoint"] == "/recall" and line["status"] == 200
    assert line["cold_start"] is True and line["degraded"] is False
    assert line["latency_ms"] >= 0


# --------------------------------------------------------------------------- security


def test_admin_reload_requires_the_token(client: TestClient) -> None:
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.post("/admin/reload", headers={"Authorization": TOKEN}).status_code == 401
    ok = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["status"] == "reloaded"


def test_admin_is_absent_without_a_token(version: tuple[Path, Path], redis_url: str) -> None:
    with TestClient(create_app(settings_for(version, redis_url, admin_token=""))) as c:
        assert c.post("/admin/reload", headers={"Authorization": "Bearer "}).status_code == 404
        assert "/admin/reload" not in c.get("/openapi.json").json()["paths"]


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.options(
        "/recall",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in response.headers


# --------------------------------------------------------------------------- batching


def test_concurrent_recalls_are_batched(version: tuple[Path, Path], redis_url: str) -> None:
    settings = settings_for(version, redis_url, batch_wait_ms=20, inference_concurrency=1)
    r = redis.Redis.from_url(redis_url)
    for n in range(8):
        r.rpush(session_key(f"b{n}", PREFIX), f"1700000000.0|{item_id(n)}")
    r.close()
    with TestClient(create_app(settings)) as c:
        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(
                pool.map(
                    lambda n: c.post("/recall", json={"user_id": f"b{n % 8}", "k": 5}), range(64)
                )
            )
        text = c.get("/metrics").text
    assert all(x.status_code == 200 and not x.json()["degraded"] for x in responses)
    for n, x in enumerate(responses):  # each request got its own user's answer
        assert x.json()["user_id"] == f"b{n % 8}"
        assert x.json()["items"] == responses[n % 8].json()["items"]
    batches = float(text.split("t2diff_batch_size_count ")[1].split()[0])
    assert batches < 64  # some requests shared an engine call
