"""Which load client can drive the service on this box: ``GET /healthz`` (no Redis read,
no tower) from one shared ``httpx.AsyncClient``, from one ``httpx.AsyncClient`` per
connection, and from ``bench_service.Connection`` (a raw asyncio keep-alive client), at 8
and 64 concurrent connections, against one ``python -m service.server``.

    .venv/bin/python bench/http_client_probe.py [--seconds 4]

Why: ``bench_service.py`` used the shared httpx client, and its 64-client cells measured
the client (docs/results/service.md, "The client was the bottleneck").
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_service import Connection  # noqa: E402
from service_fixtures import build_tiny_export, build_tiny_index  # noqa: E402

from t2diff_cli.local_stack import (  # noqa: E402
    RedisServer,
    free_port,
    service_process,
    service_settings,
)

Call = Callable[[], Awaitable[object]]


async def rate(
    make_calls: Callable[[int], Awaitable[list[Call]]], conc: int, seconds: float
) -> str:
    calls = await make_calls(conc)
    latencies: list[float] = []

    async def loop(call: Call, until: float, record: bool) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            await call()
            if record:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(loop(c, time.perf_counter() + 1.0, False) for c in calls))
    started = time.perf_counter()
    await asyncio.gather(*(loop(c, started + seconds, True) for c in calls))
    ms = np.array(latencies) * 1000
    return (f"{len(latencies) / (time.perf_counter() - started):7.0f} req/s  "
            f"p50 {np.percentile(ms, 50):7.1f}  p99 {np.percentile(ms, 99):7.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="http-probe-"))
    try:
        artifacts = build_tiny_export(work / "artifacts" / "p", num_items=2000, model_version="p")
        index = build_tiny_index(artifacts, work / "indexes" / "p")
        with RedisServer() as redis_server:
            port = free_port()
            env = {**service_settings(artifacts, index, redis_server.url, port),
                   "T2DIFF_LOG_LEVEL": "warning", "T2DIFF_WATCH_INTERVAL_S": "0"}  # fmt: skip
            with service_process(env, 120, cwd=ROOT, stop_timeout_s=30) as base:

                async def shared(n: int) -> list[Call]:
                    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
                    client = httpx.AsyncClient(base_url=base, limits=limits, timeout=30)
                    return [lambda: client.get("/healthz")] * n

                async def per_connection(n: int) -> list[Call]:
                    clients = [httpx.AsyncClient(base_url=base, timeout=30) for _ in range(n)]
                    return [lambda c=c: c.get("/healthz") for c in clients]  # type: ignore[misc]

                async def raw(n: int) -> list[Call]:
                    conns = [await Connection.open("127.0.0.1", port) for _ in range(n)]
                    return [lambda c=c: c.get("/healthz") for c in conns]  # type: ignore[misc]

                for name, make in (("httpx, one shared client", shared),
                                   ("httpx, a client per connection", per_connection),
                                   ("raw asyncio (bench_service.Connection)", raw)):  # fmt: skip
                    for conc in (8, 64):
                        line = asyncio.run(rate(make, conc, args.seconds))
                        print(f"{name:42s} {conc:3d} connections: {line}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
