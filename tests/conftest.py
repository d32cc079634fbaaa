"""Shared fixtures: a real, throw-away ``redis-server`` for the whole test session.

Tests talk to a real Redis (no fakes): the session layout, pipelining, transactions and
timeouts are exactly what production runs.  The server has persistence off and listens on
a free loopback port, so it never touches a developer's own Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

REDIS_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_ping(port: int) -> bool:
    # Raw RESP over a socket so this fixture needs no client library.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL ``redis://127.0.0.1:PORT/0`` of a private redis-server for this test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    # Output to a file, not a pipe: nobody drains a pipe during the run, and a full one
    # would block the server.  It is read only to explain a failed start.
    log_file = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not _redis_ping(port):
            if process.poll() is not None:
                log_file.seek(0)
                output = log_file.read().decode(errors="replace")[-2000:]
                pytest.fail(f"redis-server exited with {process.returncode}: {output}")
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer PING within {REDIS_START_TIMEOUT_S}s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


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
