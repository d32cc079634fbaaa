"""``python -m worker.server --ping --socket PATH``: is a tower worker answering?

Through the service's own client (``service.remote_tower``), so a health check exercises
the same connect / frame / header path as a ``/recall`` does.  Only the standard library
and the torch-free client are imported here.
"""

from __future__ import annotations

from pathlib import Path


def ping(socket_path: Path, timeout_s: float = 3.0) -> int:
    """0 when a worker answers a health frame at ``socket_path`` (prints its versions).

    One try (a container health check retries by itself), through the service's client."""
    from service.remote_tower import TowerWorkerClient, WorkerError, wait_healthy

    client = TowerWorkerClient(socket_path, timeout_s=timeout_s, connect_timeout_s=timeout_s,
                               spin_us=0)  # fmt: skip
    try:
        header = wait_healthy(client, deadline_s=0.0)
    except WorkerError as exc:
        print(f"tower worker at {socket_path}: {exc}")
        return 1
    finally:
        client.close()
    assert header is not None  # no stop event: an answer or an exception
    print(f"tower worker at {socket_path}: versions {header.get('versions')}")
    return 0
