"""The local stack that the demo, the tests, the benchmarks and the load test start on this
machine: a private ``redis-server`` and the recall API as a child process.

:class:`RedisServer` runs ``redis-server`` on a loopback port in a private directory with
persistence off (optionally a ``SAVE`` snapshot that a restart on the same port loads), waits
for PING, and can be stopped, killed (SIGKILL), paused (SIGSTOP), resumed and restarted on
the same port for fault tests.  :func:`wait_until_ready` polls a service's ``/readyz``;
:func:`service_process` starts ``python -m service.server`` and waits for it.

Only the standard library is imported here: ``loadtest/run_load.py`` must import without
the serving extras, and the test fixtures need no Redis client to start a server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"
REDIS_START_TIMEOUT_S = 10.0
# How long a stop waits for SIGTERM to end a process before it sends SIGKILL.
STOP_TIMEOUT_S = 5.0
SNAPSHOT_FILE = "snapshot.rdb"
REDIS_LOG_FILE = "redis.log"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str | None:
    """Path of ``redis-server`` (PATH first, then the Debian package's), or None."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    return binary if Path(binary).exists() else None


def redis_command(port: int, *args: str, timeout_s: float = 0.5) -> bytes:
    """One Redis command over raw RESP (no client library); the first reply chunk."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
        sock.sendall(payload.encode())
        return sock.recv(256)


def stop_process(
    process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S, kill_group: bool = False
) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout_s``; always reaped.

    ``kill_group``: the SIGKILL goes to the process group that ``process`` leads (started
    with ``start_new_session``), so that its children (uvicorn workers) go too.
    """
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if kill_group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait()


def file_tail(path: Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of a log file ("" when it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class RedisServer:
    """A private ``redis-server`` on ``127.0.0.1:port`` (a free port unless given).

    Persistence is off.  With ``keep_snapshot`` the server writes :meth:`snapshot` (``SAVE``)
    to ``workdir/snapshot.rdb`` and a restart on the same port loads it again, as a Redis
    restarted from its last RDB snapshot would; without it a restarted server is empty.
    Output goes to ``workdir/redis.log`` (a file, not a pipe nobody drains).  ``workdir``
    defaults to a temporary directory that :meth:`close` removes.  The server runs in its
    own session, so a Ctrl-C meant for the caller does not stop it before the caller does.

    Use it as a context manager (start on enter, stop on exit), or call :meth:`start` and
    :meth:`stop` yourself; after :meth:`stop` or :meth:`kill`, :meth:`start` restarts it on
    the same port.

    ``password`` starts it with ``--requirepass`` (and :attr:`url` carries the password);
    ``extra_args`` go to ``redis-server`` as they are (e.g. ``--tls-port`` and its files: the
    plain port stays, for the start-up PING).
    """

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        keep_snapshot: bool = False,
        start_timeout_s: float = REDIS_START_TIMEOUT_S,
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.keep_snapshot = keep_snapshot
        self.start_timeout_s = start_timeout_s
        self.password = password
        self.extra_args = list(extra_args)
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="t2diff-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.password is None:
            return f"redis://{LOOPBACK}:{self.port}/0"
        secret = urllib.parse.quote(self.password, safe="")
        return f"redis://:{secret}@{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / REDIS_LOG_FILE

    def start(self) -> None:
        """Start the server and wait until it answers PING (RuntimeError otherwise)."""
        command = [
            self.binary, "--port", str(self.port), "--bind", LOOPBACK,
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        if self.keep_snapshot:
            command += ["--dbfilename", SNAPSHOT_FILE]
        if self.password is not None:
            command += ["--requirepass", self.password]
        command += self.extra_args
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not self.ping():
            if self.process.poll() is not None:
                returncode = self.process.returncode
                self.process = None
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {returncode}: "
                    f"{file_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{self.start_timeout_s:g}s"
                )
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            if self.password is not None:  # a successful AUTH is an answer too
                return redis_command(self.port, "AUTH", self.password, timeout_s=0.2) == b"+OK\r\n"
            return redis_command(self.port, "PING", timeout_s=0.2).startswith(b"+PONG")
        except OSError:
            return False

    def snapshot(self) -> None:
        """``SAVE`` the data set, so that a restart on this port loads it again."""
        if not self.keep_snapshot:
            raise RuntimeError("this RedisServer was started without keep_snapshot")
        reply = redis_command(self.port, "SAVE", timeout_s=60)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"redis SAVE failed: {reply!r}")

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing is answered."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after :data:`STOP_TIMEOUT_S`); a no-op when not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot exit
        stop_process(self.process)
        self.process = None

    def close(self) -> None:
        """Stop the server and remove its directory when it is the temporary one."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class ServiceNotReady(RuntimeError):
    """``/readyz`` did not answer 200 in time, or the service's process exited first
    (then ``returncode`` is its exit status)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def wait_until_ready(
    base_url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    ready_in_a_row: int = 1,
    poll_s: float = 0.2,
) -> None:
    """Poll ``GET {base_url}/readyz`` until it answers 200 ``ready_in_a_row`` times in a row.

    ``ready_in_a_row`` > 1 is for several workers behind one port: any one of them answers
    each request, so one 200 does not mean that all are ready.  With ``process``, gives up
    as soon as that process exits.  Raises :class:`ServiceNotReady`.
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    in_a_row = 0
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceNotReady(
                f"{base_url} exited with {process.returncode}", process.returncode
            )
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:  # noqa: S310
                ready = response.status == 200
        except urllib.error.HTTPError as exc:
            ready, last = False, exc.read().decode(errors="replace")[:500]
        except OSError as exc:
            ready, last = False, str(exc)
        in_a_row = in_a_row + 1 if ready else 0
        if in_a_row >= ready_in_a_row:
            return
        # Mid-streak, ask again soon: the other workers are probably ready too.
        time.sleep(min(poll_s, 0.05) if in_a_row else poll_s)
    raise ServiceNotReady(f"{base_url} not ready after {timeout_s:.0f}s: {last}")


def service_settings(
    artifacts_dir: Path, index_dir: Path, redis_url: str, port: int
) -> dict[str, str]:
    """The ``T2DIFF_*`` variables that point a service at one model version and Redis."""
    return {
        "T2DIFF_ARTIFACTS_DIR": str(artifacts_dir),
        "T2DIFF_INDEX_DIR": str(index_dir),
        "T2DIFF_REDIS_URL": redis_url,
        "T2DIFF_PORT": str(port),
    }


@contextmanager
def service_process(
    env: dict[str, str],
    ready_timeout_s: float,
    cwd: Path | None = None,
    log_path: Path | None = None,
    ready_in_a_row: int = 1,
    stop_timeout_s: float = 20.0,
) -> Iterator[str]:
    """Run ``python -m service.server`` with ``os.environ`` + ``env`` (``T2DIFF_PORT`` must be
    in ``env``); yield its base URL once ``/readyz`` answers; stop it on exit.

    Output is inherited, or appended to ``log_path`` (whose tail a failed start reports).
    """
    base = f"http://{LOOPBACK}:{env['T2DIFF_PORT']}"
    log = log_path.open("ab") if log_path is not None else None
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.server"],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
    finally:
        if log is not None:
            log.close()
    try:
        try:
            wait_until_ready(base, ready_timeout_s, process, ready_in_a_row)
        except ServiceNotReady as exc:
            if log_path is None:
                raise
            raise ServiceNotReady(f"{exc}: {file_tail(log_path)}", exc.returncode) from None
        yield base
    finally:
        stop_process(process, stop_timeout_s)
