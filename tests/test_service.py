"""The recall service end to end: real Redis, real ONNX Runtime, real FAISS, tiny export.

The export (``tests/service_fixtures.py``) mean-pools the user's item vectors over a
clustered item table (cluster of row r = r % 10), so a user who viewed items of one cluster
must be recalled items of that cluster: the tests check meaning, not only shapes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from service_fixtures import TINY_MODEL_VERSION, build_tiny_export, build_tiny_index, item_id

from contracts.manifest import USER_TOWER_FILE
from contracts.sessions import Session, encode_event, session_key
from service.app import create_app
from service.core import RecallEngine, RecallRequest
from service.settings import Settings
from service.tower import UserTowerRunner

N_CLUSTERS = 10
INDEX_VERSION = "idx-0001"
PREFIX = "t2svc"
MAX_K = 50
DEFAULT_K = 20
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_export(tmp_path_factory.mktemp("artifacts") / TINY_MODEL_VERSION)


@pytest.fixture(scope="module")
def tiny_index(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_index(tiny_export, tmp_path_factory.mktemp("indexes") / INDEX_VERSION)


def make_settings(artifacts: Path, index: Path, redis_url: str) -> Settings:
    return Settings(
        artifacts_dir=artifacts,
        index_dir=index,
        redis_url=redis_url,
        redis_prefix=PREFIX,
        default_k=DEFAULT_K,
        max_k=MAX_K,
        # Generous for a loaded CI box; production keeps the tight defaults.
        redis_timeout_ms=1000,
        redis_pool_timeout_ms=1000,
        # A loaded 2-core CI box must not turn these meaning tests into degraded answers.
        budget_ms=5000,
        watch_interval_s=0,
    )


@pytest.fixture
def client(tiny_export: Path, tiny_index: Path, redis_url: str) -> Iterator[TestClient]:
    # As a context manager so the lifespan (loading everything) runs.
    with TestClient(create_app(make_settings(tiny_export, tiny_index, redis_url))) as c:
        yield c


def put_session(redis_url: str, user_id: str, rows: list[int]) -> list[str]:
    """Store a session of the given item rows (oldest first); returns their raw ids."""
    ids = [item_id(r) for r in rows]
    client = redis.Redis.from_url(redis_url)
    try:
        client.rpush(
            session_key(user_id, PREFIX),
            *(encode_event(i, NOW - 60 * (len(ids) - n)) for n, i in enumerate(ids)),
        )
    finally:
        client.close()
    return ids


def row_of(raw_id: str) -> int:
    return int(raw_id.rsplit("-", 1)[-1].rsplit("|", 1)[-1])


# --------------------------------------------------------------------------- recall


def test_recall_happy_path(client: TestClient, redis_url: str) -> None:
    seen = put_session(redis_url, "alice", [3, 13, 23, 33])  # cluster 3
    response = client.post("/recall", json={"user_id": "alice", "k": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == "alice"
    assert body["model_version"] == TINY_MODEL_VERSION
    assert body["index_version"] == INDEX_VERSION
    assert body["cold_start"] is False
    assert body["latency_ms"] >= 0
    items = body["items"]
    assert len(items) == 10
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    ids = [item["item_id"] for item in items]
    assert len(set(ids)) == 10
    assert not set(ids) & set(seen)  # exclude_seen defaults to true
    # The tower embeds the user inside cluster 3, so its neighbours are cluster 3 items.
    assert all(row_of(i) % N_CLUSTERS == 3 for i in ids), ids


def test_exclude_seen_false_keeps_seen_items(client: TestClient, redis_url: str) -> None:
    # One item: the user embedding is that item's own vector, its best match by far.
    (seen,) = put_session(redis_url, "bob", [3])
    kept = client.post("/recall", json={"user_id": "bob", "k": 10, "exclude_seen": False})
    dropped = client.post("/recall", json={"user_id": "bob", "k": 10, "exclude_seen": True})
    kept_ids = [i["item_id"] for i in kept.json()["items"]]
    dropped_ids = [i["item_id"] for i in dropped.json()["items"]]
    assert kept_ids[0] == seen
    assert seen not in dropped_ids and len(dropped_ids) == 10
    # Excluding changes nothing else: the other items keep their ranking.
    assert dropped_ids[:9] == kept_ids[1:]


def test_default_k_and_determinism(client: TestClient, redis_url: str) -> None:
    put_session(redis_url, "carol", [7, 17, 27])  # item 7's id contains '|'
    first = client.post("/recall", json={"user_id": "carol"}).json()
    second = client.post("/recall", json={"user_id": "carol"}).json()
    assert len(first["items"]) == DEFAULT_K
    # Fixed noise (manifest seed) and a fixed session: the same answer every time.
    assert first["items"] == second["items"]


def test_unknown_user_gets_cold_start(client: TestClient, redis_url: str, tiny_export: Path):
    tower = UserTowerRunner(tiny_export)
    expected = [tower.item_ids[int(r)] for r in tower.popular_rows[:5]]
    response = client.post("/recall", json={"user_id": "nobody", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["cold_start"] is True
    assert [i["item_id"] for i in body["items"]] == expected
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # Only items the model does not know: still a cold start.
    client_redis = redis.Redis.from_url(redis_url)
    client_redis.rpush(session_key("newcomer", PREFIX), encode_event("brand-new-item", NOW))
    client_redis.close()
    assert client.post("/recall", json={"user_id": "newcomer", "k": 5}).json()["cold_start"]


def test_concurrent_requests(client: TestClient, redis_url: str) -> None:
    # Requests overlap on the event loop, the Redis pool and the inference threads; each
    # must still get its own user's answer.
    for n in range(8):
        put_session(redis_url, f"user-{n}", [n, n + 10, n + 20])
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(
            pool.map(
                lambda n: client.post("/recall", json={"user_id": f"user-{n % 8}", "k": 5}),
                range(32),
            )
        )
    assert all(r.status_code == 200 for r in responses)
    for n, response in enumerate(responses):
        ids = [i["item_id"] for i in response.json()["items"]]
        assert response.json()["user_id"] == f"user-{n % 8}"
        assert ids == [i["item_id"] for i in responses[n % 8].json()["items"]]
        assert all(row_of(i) % N_CLUSTERS == n % 8 for i in ids), ids


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "a", "k": 0}, "k"),
        ({"user_id": "a", "k": MAX_K + 1}, "k"),
        ({"user_id": "a", "k": -3}, "k"),
        ({"user_id": "a", "k": "10"}, "k"),
        ({"user_id": "a", "k": 2.5}, "k"),
        ({"k": 5}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"user_id": 42}, "user_id"),
        ({"user_id": "a", "exclude_seen": "yes"}, "exclude_seen"),
        ({"user_id": "a", "exlude_seen": False}, "exlude_seen"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(
    client: TestClient, body: dict, field: str
) -> None:
    response = client.post("/recall", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(error["loc"][-1] == field for error in errors), errors


def test_non_json_body_is_422(client: TestClient) -> None:
    response = client.post(
        "/recall", content=b"not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


# --------------------------------------------------------------------------- health


def test_healthz_and_readyz_when_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model_version": TINY_MODEL_VERSION,
        "index_version": INDEX_VERSION,
        "redis": "up",
    }


def unready(settings: Settings) -> tuple[dict, int, int]:
    """(readyz reasons, /recall status, /healthz status) of an app with these settings."""
    with TestClient(create_app(settings)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unavailable"
        recall = c.post("/recall", json={"user_id": "alice", "k": 5})
        return ready.json()["reasons"], recall.status_code, c.get("/healthz").status_code


def test_readyz_503_when_artifacts_missing(tmp_path: Path, tiny_index: Path, redis_url: str):
    missing = tmp_path / "no-such-version"
    reasons, recall_status, health = unready(make_settings(missing, tiny_index, redis_url))
    assert set(reasons) == {"tower"}
    assert str(missing) in reasons["tower"]
    assert recall_status == 503
    assert health == 200  # alive, just not ready


def test_readyz_503_when_a_file_is_corrupted(
    tmp_path: Path, tiny_export: Path, tiny_index: Path, redis_url: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    path = broken / USER_TOWER_FILE
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 8):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    reasons, recall_status, _ = unready(make_settings(broken, tiny_index, redis_url))
    assert "checksum" in reasons["tower"] and USER_TOWER_FILE in reasons["tower"]
    assert recall_status == 503


def test_readyz_200_when_redis_unreachable(
    tiny_export: Path, tiny_index: Path, closed_redis_url: str
) -> None:
    """Ready means "can answer": without Redis the answer is the popular items (degraded),
    so Redis's health is a field of the body and a metric, not the status."""
    with TestClient(create_app(make_settings(tiny_export, tiny_index, closed_redis_url))) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready" and body["redis"] == "down"
        assert "cannot reach Redis" in body["redis_error"] and "reasons" not in body
        assert c.post("/recall", json={"user_id": "alice", "k": 5}).status_code == 200
        assert "t2diff_redis_up 0.0" in c.get("/metrics").text


def test_recall_degraded_when_redis_unreachable(
    tiny_export: Path, tiny_index: Path, closed_redis_url: str
) -> None:
    with TestClient(create_app(make_settings(tiny_export, tiny_index, closed_redis_url))) as c:
        response = c.post("/recall", json={"user_id": "alice", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["degraded"] is True and body["degraded_reason"] == "redis_error"
    assert len(body["items"]) == 5 and body["cold_start"] is False


def test_readyz_503_when_index_is_of_another_model(
    tmp_path: Path, tiny_index: Path, redis_url: str
) -> None:
    other = build_tiny_export(tmp_path / "other", model_version="tiny-0002")
    reasons, recall_status, _ = unready(make_settings(other, tiny_index, redis_url))
    assert set(reasons) == {"engine"}
    assert "tiny-0002" in reasons["engine"] and TINY_MODEL_VERSION in reasons["engine"]
    assert recall_status == 503


# --------------------------------------------------------------------------- engine


def test_engine_mixed_batch(tiny_export: Path, tiny_index: Path) -> None:
    from index_builder.loaded import load_index

    engine = RecallEngine(UserTowerRunner(tiny_export), load_index(tiny_index))
    warm = Session([item_id(r) for r in (5, 15, 25)], [NOW - 30, NOW - 20, NOW - 10])
    requests = [
        RecallRequest("w-excl", 4, True),
        RecallRequest("cold", 3, True),
        RecallRequest("w-keep", 12, False),
    ]
    results = engine.recall_batch(requests, [warm, Session(), warm], NOW)
    assert [r.user_id for r in results] == ["w-excl", "cold", "w-keep"]
    assert [len(r.items) for r in results] == [4, 3, 12]
    assert [r.cold_start for r in results] == [False, True, False]
    excluded = {i.item_id for i in results[0].items}
    assert not excluded & set(warm.item_ids)
    assert set(warm.item_ids) <= {i.item_id for i in results[2].items}


def test_service_imports_without_torch() -> None:
    # Serving installs have no torch: importing the service (and the index loader it uses)
    # must not pull it in, even when it is installed.
    code = (
        "import sys, service.app, service.server, service.sessions, index_builder.loaded;"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch'];"
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mode", ["off", "own", "shared"])
def test_ort_cpu_arena_modes_answer_alike(tiny_export: Path, mode: str) -> None:
    """ORT_CPU_ARENA only changes where ONNX Runtime keeps its buffers, never an answer;
    "off" (the default: memory flat over hot swaps) turns each session's arena off."""
    from service.settings import Settings

    assert Settings().ort_cpu_arena == "off"
    reference = UserTowerRunner(tiny_export)
    tower = UserTowerRunner(tiny_export, cpu_arena=mode)
    options = tower._session_options(None)
    assert options.enable_cpu_mem_arena is (mode != "off")
    tokens, stamps = [[3, 4, 5], [1, 2, 3, 4, 5]], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]]
    np.testing.assert_array_equal(
        tower.embed_tokens(tokens, stamps, 10.0), reference.embed_tokens(tokens, stamps, 10.0)
    )


def test_ort_cpu_arena_rejects_an_unknown_mode(tiny_export: Path) -> None:
    with pytest.raises(ValueError, match="cpu_arena"):
        UserTowerRunner(tiny_export, cpu_arena="big")
