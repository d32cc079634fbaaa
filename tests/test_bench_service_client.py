"""``bench_service.Connection``, the benchmark's own keep-alive HTTP/1.1 load client, against
a real uvicorn server: status, JSON bodies, several requests on one connection."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import uvicorn

from t2diff_cli.local_stack import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_service import Connection  # noqa: E402


async def echo_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """POST: the JSON body back with its size; GET: 404 with a short body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "POST":
        status, answer = 200, json.dumps({"got": json.loads(body), "bytes": len(body)}).encode()
    else:
        status, answer = 404, b"no"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(answer)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def test_connection_posts_json_and_keeps_the_connection() -> None:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(echo_app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)

        async def run() -> None:
            connection = await Connection.open("127.0.0.1", port)
            try:
                for n in range(3):  # one connection, several requests
                    body = {"user_id": f"u{n}", "k": 100, "pad": "x" * 5000 * n}
                    status, answer = await connection.post_json("/recall", body)
                    assert status == 200
                    assert json.loads(answer)["got"] == body
                status, answer = await connection.get("/missing")
                assert (status, answer) == (404, b"no")
            finally:
                connection.close()

        asyncio.run(run())
    finally:
        server.should_exit = True
        thread.join(10)
