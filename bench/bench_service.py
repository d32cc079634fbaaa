"""Throughput and latency of ``POST /recall`` through a real uvicorn server and real Redis,
with micro-batching on and off, at 1, 8 and 64 concurrent clients.

    .venv/bin/python bench/bench_service.py [--seconds 5] [--items 20000] [--out FILE.md]
    .venv/bin/python bench/bench_service.py --artifacts EXPORT [--seconds 10]

It builds a synthetic user-tower export (the tests' mean-pool ONNX graph over a clustered
item table, ``tests/service_fixtures.py``), or takes a real one (``--artifacts``: e.g. the
T2Diff tower of ``t2diff export``, whose 50-step reverse process is what batching is for;
its sessions use the export's own item ids, and the xhat cache is off so every request runs
the tower), builds its FAISS index with the project's builder,
starts a private ``redis-server`` with one warm session per user, then for each setting
starts ``python -m service.server`` (one worker, settings from ``T2DIFF_*``) and drives it
with asyncio clients in this process, one keep-alive connection each (``Connection``).  Reports p50/p95/p99 latency seen by the client,
requests per second, mean micro-batch size (from ``/metrics``) and degraded answers.
The client shares the machine's cores with the server: numbers are for comparing settings
on one machine, not absolute capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from service_fixtures import build_tiny_export, build_tiny_index, item_id  # noqa: E402

from contracts.manifest import ITEM_IDS_FILE  # noqa: E402
from contracts.sessions import encode_event, session_key  # noqa: E402
from t2diff_cli.local_stack import (  # noqa: E402
    RedisServer,
    free_port,
    service_process,
    service_settings,
)

CONCURRENCY = (1, 8, 64)
SETTINGS = {"on": {"T2DIFF_MAX_BATCH": "64", "T2DIFF_BATCH_WAIT_MS": "2"}, "off": {"T2DIFF_MAX_BATCH": "1"}}  # fmt: skip


def load_sessions(url: str, users: int, item_ids: list[str], per_user: int) -> None:
    client = redis.Redis.from_url(url)
    rng = random.Random(0)
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        for u in range(users):
            rows = [rng.randrange(len(item_ids)) for _ in range(per_user)]
            events = (encode_event(item_ids[r], now - 60 * (per_user - n))
                      for n, r in enumerate(rows))  # fmt: skip
            pipe.rpush(session_key(f"u{u}"), *events)
        pipe.execute()
    client.close()


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams, for the load: POST a JSON
    body, read the status and the ``Content-Length`` body.

    Why not httpx (which the rest of the project uses): as a load generator on the same 2
    cores it was the bottleneck. Against ``GET /healthz`` (``bench/http_client_probe.py``,
    2026-11-23, `cpu-2core`) one shared ``AsyncClient`` gave 292 requests/s at 8 connections
    and 88 at 64 (p99 3.4 s), a client per connection 485 and 508, and this client 3,691 and
    3,500: httpx spends ~2 ms of CPU per request and its shared pool collapses at 64
    connections, which made the 64-client cells measure httpx rather than the service.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post_json(self, path: str, body: dict) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        return await self._answer()

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        return await self._answer()

    async def _answer(self) -> tuple[int, bytes]:
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith("content-length:"))  # fmt: skip
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def drive(host: str, port: int, concurrency: int, seconds: float, users: int) -> dict:
    latencies: list[float] = []
    degraded = errors = 0

    async def worker(seed: int, until: float, record: bool) -> None:
        nonlocal degraded, errors
        rng = random.Random(seed)
        connection = await Connection.open(host, port)
        try:
            while time.perf_counter() < until:
                body = {"user_id": f"u{rng.randrange(users)}", "k": 100}
                started = time.perf_counter()
                status, answer = await connection.post_json("/recall", body)
                elapsed = time.perf_counter() - started
                if not record:
                    continue
                if status != 200:
                    errors += 1
                    continue
                latencies.append(elapsed)
                degraded += bool(json.loads(answer)["degraded"])
        finally:
            connection.close()

    warm_until = time.perf_counter() + 1.0
    await asyncio.gather(*(worker(n, warm_until, False) for n in range(concurrency)))
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(worker(1000 + n, until, True) for n in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "degraded": degraded,
        "errors": errors,
    }


def batch_stats(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("t2diff_batch_size_sum", "t2diff_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("t2diff_batch_size_sum", 0.0), values.get("t2diff_batch_size_count", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per cell")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--session-len", type=int, default=30)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--artifacts", type=Path, help="a real export instead of the synthetic")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    try:
        if args.artifacts is not None:
            artifacts = args.artifacts.resolve()
            if not (artifacts / ITEM_IDS_FILE).is_file():
                raise SystemExit(f"{artifacts} is not an export (no {ITEM_IDS_FILE})")
            item_ids = json.loads((artifacts / ITEM_IDS_FILE).read_text(encoding="utf-8"))
        else:
            artifacts = build_tiny_export(
                work / "artifacts" / "bench", num_items=args.items, dim=args.dim, n_clusters=50,
                max_seq_len=50, model_version="bench",
            )  # fmt: skip
            item_ids = [item_id(r) for r in range(args.items)]
        index = build_tiny_index(artifacts, work / "indexes" / "bench")
        with RedisServer() as redis_server:
            load_sessions(redis_server.url, args.users, item_ids, args.session_len)
            rows = []
            for mode, extra in SETTINGS.items():
                env = {
                    **service_settings(artifacts, index, redis_server.url, free_port()),
                    "T2DIFF_LOG_LEVEL": "warning",
                    "T2DIFF_BUDGET_MS": "5000",  # measure latency, not the fallback
                    "T2DIFF_WATCH_INTERVAL_S": "0",
                    "OMP_WAIT_POLICY": "PASSIVE",
                    # a real tower: every request runs it (no xhat reuse across requests)
                    **({"T2DIFF_XHAT_CACHE_SIZE": "0"} if args.artifacts is not None else {}),
                    **extra,
                }
                with service_process(env, 120, cwd=ROOT, stop_timeout_s=30) as base:
                    for concurrency in CONCURRENCY:
                        before = batch_stats(base)
                        port = int(env["T2DIFF_PORT"])
                        result = asyncio.run(
                            drive("127.0.0.1", port, concurrency, args.seconds, args.users)
                        )
                        after = batch_stats(base)
                        batches = after[1] - before[1]
                        result["mean_batch"] = (after[0] - before[0]) / batches if batches else 0.0
                        rows.append({"batching": mode, "clients": concurrency, **result})
                        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = (
        "| batching | clients | p50 ms | p95 ms | p99 ms | req/s | mean batch | degraded | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['batching']} | {r['clients']} | {r['p50']:.2f} | {r['p95']:.2f} | "
        f"{r['p99']:.2f} | {r['rps']:.0f} | {r['mean_batch']:.1f} | {r['degraded']} | "
        f"{r['errors']} |"
        for r in rows
    ]
    table = header + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
