"""A swapped-out version is freed: after a hot swap nothing keeps the old engine alive, so
its ONNX sessions, FAISS index and xhat cache go and the heap is trimmed.  Before the fix
the swap froze the heap (``gc.freeze``) while requests still held the old engine, so what
held it in a reference cycle went to the permanent generation, which the collector never
scans: the old version stayed until the next swap.  bench/swap_memory.py measures RSS over
30 swaps under traffic; docs/results/service.md, "Memory over hot swaps"."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fixtures import build_version, item_id, point_link

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.usefixtures("one_omp_thread")

TOKEN = "release-token"
A, B = "rel-a", "rel-b"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    build_version(root, A, seed=0)
    build_version(root, B, seed=1)
    return root


def _settings(root: Path, redis_url: str) -> Settings:
    return Settings(
        artifacts_dir=root / "artifacts" / "current",
        index_dir=root / "indexes" / "current",
        redis_url=redis_url,
        budget_ms=500,
        max_budget_ms=500,  # the swap waits this (+2 s) for requests holding the old engine
        redis_timeout_ms=2000,
        redis_pool_timeout_ms=2000,
        watch_interval_s=0,
        admin_token=TOKEN,
        max_batch=1,  # one batch per request: the recalls spread over worker threads
        inference_concurrency=4,
    )


def _swap(client: TestClient, root: Path, version: str) -> None:
    point_link(root / "indexes" / "current", version)
    point_link(root / "artifacts" / "current", version)
    reply = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.json()["status"] == "reloaded", reply.text


def test_a_hot_swap_under_traffic_frees_the_old_version(deployment: Path, redis_url: str) -> None:
    point_link(deployment / "indexes" / "current", A)
    point_link(deployment / "artifacts" / "current", A)
    app = create_app(_settings(deployment, redis_url))
    with TestClient(app) as client:
        state = app.state.service
        for n in range(8):
            client.post("/events", json={"user_id": f"r{n}", "item_id": item_id(n)})

        def recall(n: int) -> str:
            response = client.post("/recall", json={"user_id": f"r{n % 8}", "k": 5})
            assert response.status_code == 200
            return str(response.json()["model_version"])

        for version in (B, A, B):
            old_engine = weakref.ref(state.engine)
            old_tower = weakref.ref(state.engine.tower)
            with ThreadPoolExecutor(max_workers=8) as pool:
                swapped = pool.submit(_swap, client, deployment, version)
                answered = set(pool.map(recall, range(32)))  # during the swap
                swapped.result()
            assert answered <= {A, B}
            gc.collect()
            assert old_engine() is None, "the swapped-out engine is still referenced"
            assert old_tower() is None, "the swapped-out tower is still referenced"
            assert recall(0) == version


def test_an_engine_held_during_the_swap_is_not_frozen_with_its_holder(
    deployment: Path, redis_url: str
) -> None:
    """A request still holding the old engine when the swap settles the heap, through a
    reference cycle (frames, futures and callbacks make them): once it lets go, the
    collector frees the cycle and the old version.  Failed before the fix: the swap froze
    the cycle, and ``gc.collect()`` never looks at frozen objects."""
    point_link(deployment / "indexes" / "current", A)
    point_link(deployment / "artifacts" / "current", A)
    app = create_app(_settings(deployment, redis_url))
    with TestClient(app) as client:
        state = app.state.service
        holder: dict[str, object] = {"engine": state.engine}
        holder["self"] = holder  # a cycle: only the collector frees it
        old_engine = weakref.ref(state.engine)
        _swap(client, deployment, B)
        assert old_engine() is not None  # still held, as by a request in flight
        del holder
        gc.collect()
        assert old_engine() is None, "the old engine was frozen with what held it"
        response = client.post("/recall", json={"user_id": "x", "k": 5})
        assert response.json()["model_version"] == B
