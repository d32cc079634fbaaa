"""A real uvicorn server around an app, in a thread of the test process, for tests that need
what only a real server shows: HTTP parsing, keep-alive connections, what happens to a
connection after an error."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from t2diff_cli.local_stack import free_port

# A bound on waiting for the lifespan (loading a tiny version) on a busy 2-core box, not a
# timing claim.
START_WITHIN_S = 60.0


@contextmanager
def live_server(app: Any) -> Iterator[int]:
    """Serve ``app`` on a free loopback port (lifespan included); yields the port."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_WITHIN_S
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
