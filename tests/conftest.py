"""Shared fixtures: a real, throw-away ``redis-server`` for the whole test session.

Tests talk to a real Redis (no fakes): the session layout, pipelining, transactions and
timeouts are exactly what production runs.  The server has persistence off and listens on
a free loopback port, so it never touches a developer's own Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from t2diff_cli.local_stack import RedisServer, free_port, redis_binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL ``redis://127.0.0.1:PORT/0`` of a private redis-server for this test session."""
    if redis_binary() is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    server = RedisServer()
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="module")
def one_omp_thread() -> Iterator[None]:
    """One OpenMP thread for a module's FAISS work (``pytestmark = usefixtures(...)``): on a
    busy 2-core runner FAISS's spinning threads can be 100x slower."""
    import faiss  # imported here so that conftest loads without the serving extra

    from index_builder import configure_threads

    previous = faiss.omp_get_max_threads()
    configure_threads(1)
    yield
    configure_threads(None)
    faiss.omp_set_num_threads(previous)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied (FLUSHALL) before each test."""
    import redis  # the serving extra; imported here so conftest loads without it

    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


@pytest.fixture
def closed_redis_url() -> str:
    """A Redis URL on a loopback port where nothing listens (connections are refused)."""
    return f"redis://127.0.0.1:{free_port()}/0"
