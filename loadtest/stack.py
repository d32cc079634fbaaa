"""The service stack of ``run_load.py --start-local``: a private redis-server with the
sessions of a data file, ``t2diff serve`` with small-box settings, and a Redis outage
injected mid-step."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script without the project installed
    sys.path.append(str(ROOT))

from t2diff_cli.local_stack import (  # noqa: E402 - needs ROOT on the path
    RedisServer,
    ServiceNotReady,
    file_tail,
    free_port,
    stop_process,
    wait_until_ready,
)

# --------------------------------------------------------------------------- local stack


# Serving settings for a small CPU box: one ORT and one FAISS thread per call and one
# concurrent engine call more than there are cores (while one call's Python side holds the
# GIL, the others keep the cores busy: load.md runs d-g, 3 on 2 cores), OpenMP threads
# that sleep instead of spinning, quiet logs, no artifact polling.  --service-env overrides
# any of them.
SERVICE_DEFAULTS = {
    "T2DIFF_ORT_INTRA_THREADS": "1",
    "T2DIFF_FAISS_THREADS": "1",
    "T2DIFF_INFERENCE_CONCURRENCY": str(max(1, min((os.cpu_count() or 1) + 1, 4))),
    "T2DIFF_LOG_LEVEL": "warning",
    "T2DIFF_WATCH_INTERVAL_S": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
}


class LocalStack:
    """redis-server + sessions from a data file + ``t2diff serve``, stopped on exit (also on
    an exception or Ctrl-C).  Writes ``users.txt`` (the loaded user ids, the longest sessions
    first) and ``items.txt`` (the model's item ids) for the locustfile."""

    def __init__(
        self,
        data: Path,
        artifacts: Path,
        index: Path,
        out_dir: Path,
        service_env: dict[str, str],
        ready_timeout_s: float = 180.0,
        data_format: str = "auto",
    ) -> None:
        self.data, self.artifacts, self.index = Path(data), Path(artifacts), Path(index)
        self.out_dir = Path(out_dir)
        self.service_env = service_env
        self.ready_timeout_s = ready_timeout_s
        self.data_format = data_format
        self.redis: RedisServer | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.users_file = self.out_dir / "users.txt"
        self.items_file = self.out_dir / "items.txt"
        self.env: dict[str, str] = {}
        self.sessions_loaded = 0

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        for what, path in (("--data", self.data), ("--artifacts", self.artifacts)):
            if not path.exists():
                raise RuntimeError(f"{what} {path} does not exist")
        if not (self.index / "manifest.json").exists():
            raise RuntimeError(f"--index {self.index} has no manifest.json")
        # Persistence off, but one SAVE snapshot after loading (below): a Redis killed by
        # --redis-outage-mode kill comes back with the sessions, as from its last RDB file.
        self.redis = RedisServer(workdir=self.out_dir / "redis", keep_snapshot=True)
        self.redis.start()
        print(f"run_load: redis-server on {self.redis.url}", flush=True)
        started = time.monotonic()
        load = subprocess.run(
            [sys.executable, "-m", "t2diff_cli.main", "sessions", "load", "--data",
             str(self.data), "--redis-url", self.redis.url, "--format", self.data_format],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, **self.service_env},
        )  # fmt: skip
        if load.returncode != 0:
            raise RuntimeError(f"t2diff sessions load failed: {load.stderr[-2000:]}")
        print(f"run_load: {load.stdout.strip()} ({time.monotonic() - started:.1f}s)", flush=True)
        self.sessions_loaded = self._write_users()
        self._write_items()
        self.redis.snapshot()

        self.env = {
            **SERVICE_DEFAULTS,
            **self.service_env,
            "T2DIFF_ARTIFACTS_DIR": str(self.artifacts.resolve()),
            "T2DIFF_INDEX_DIR": str(self.index.resolve()),
            "T2DIFF_REDIS_URL": self.redis.url,
            "T2DIFF_HOST": "127.0.0.1",
            "T2DIFF_PORT": str(self.port),
        }
        log = (self.out_dir / "service.log").open("ab")
        self.service = subprocess.Popen(
            [sys.executable, "-m", "t2diff_cli.main", "serve"],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()
        print(f"run_load: service ready at {self.base} (pid {self.service.pid})", flush=True)

    def _wait_ready(self) -> None:
        assert self.service is not None
        try:
            wait_until_ready(self.base, self.ready_timeout_s, self.service, poll_s=0.25)
        except ServiceNotReady as exc:
            if exc.returncode is None:
                raise  # not ready in time (a RuntimeError, like every stack failure)
            log_tail = file_tail(self.out_dir / "service.log", 3000)
            raise RuntimeError(f"t2diff serve exited with {exc.returncode}: {log_tail}") from None

    def _write_users(self) -> int:
        """The loaded user ids, longest session first (ties in a seeded shuffle), so that a
        Zipf draw over ranks makes the most active users the most frequent callers."""
        import random

        import redis

        assert self.redis is not None
        prefix = self.service_env.get("T2DIFF_REDIS_PREFIX", "t2diff") + ":session:"
        client = redis.Redis.from_url(self.redis.url, socket_timeout=30)
        try:
            keys = [k.decode() for k in client.scan_iter(match=prefix + "*", count=5000)]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            lengths = pipe.execute()
        finally:
            client.close()
        if not keys:
            raise RuntimeError("no sessions were loaded into Redis")
        users = [key[len(prefix) :] for key in keys]
        order = list(range(len(users)))
        random.Random(0).shuffle(order)
        order.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
        self.users_file.write_text("\n".join(users[i] for i in order) + "\n", encoding="utf-8")
        return len(users)

    def _write_items(self) -> None:
        import json

        ids = json.loads((self.artifacts / "item_ids.json").read_text(encoding="utf-8"))
        self.items_file.write_text("\n".join(str(i) for i in ids) + "\n", encoding="utf-8")

    def warm_up(self, requests: int) -> None:
        """A few sequential recalls (first ORT runs allocate), not measured."""
        import json
        import urllib.request

        users = self.users_file.read_text(encoding="utf-8").split()
        for n in range(requests):
            body = json.dumps({"user_id": users[n % len(users)], "k": 100}).encode()
            request = urllib.request.Request(
                f"{self.base}/recall", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                response.read()

    def close(self) -> None:
        if self.service is not None:
            stop_process(self.service, timeout_s=20, kill_group=True)
            self.service = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


class RedisOutage(threading.Thread):
    """Stops Redis ``at_s`` seconds after :meth:`start` for ``duration_s`` seconds: ``kill``
    (SIGKILL, then a new redis-server on the same port, which loads the snapshot) or
    ``stop`` (SIGSTOP/SIGCONT: connections hang instead of being refused).  Records the
    unix times ``down_at`` and ``up_at`` (Redis answers PING again)."""

    def __init__(self, redis: RedisServer, at_s: float, duration_s: float, mode: str) -> None:
        super().__init__(name="redis-outage", daemon=True)
        if mode not in ("kill", "stop"):
            raise ValueError(f"outage mode must be kill or stop, not {mode!r}")
        self.redis, self.at_s, self.duration_s, self.mode = redis, at_s, duration_s, mode
        self.cancelled = threading.Event()
        self.down_at = math.nan
        self.restart_at = math.nan
        self.up_at = math.nan
        self.error: str | None = None

    def run(self) -> None:
        try:
            if self.cancelled.wait(self.at_s):
                return
            self.redis.kill() if self.mode == "kill" else self.redis.pause()
            self.down_at = time.time()  # after the signal: Redis is surely down from here
            print(f"run_load: Redis down ({self.mode}) for {self.duration_s:g} s", flush=True)
            self.cancelled.wait(self.duration_s)  # restore even when cancelled
            self.restart_at = time.time()  # before the restart: surely down until here
            if self.mode == "kill":
                self.redis.start()
            else:
                self.redis.resume()
                deadline = time.monotonic() + 10
                while not self.redis.ping() and time.monotonic() < deadline:
                    time.sleep(0.005)
            self.up_at = time.time()
            print(
                f"run_load: Redis back after {self.up_at - self.down_at:.2f} s "
                f"(restart took {self.up_at - self.restart_at:.3f} s)",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - reported in the results
            self.error = f"{type(exc).__name__}: {exc}"
