"""Client of the tower worker (``worker.server``): the user tower computed by another
process over a Unix domain socket (wire format: ``contracts.tower_wire``).

Why: on a GPU the fastest correct path is the fused Triton kernel, which needs torch, and
this package never imports torch.  The worker owns the GPU; this client is a drop-in for
the ONNX session inside :class:`service.tower.UserTowerRunner`: same padded inputs, same
``[B, d]`` float32 output, same fixed noise (the worker draws it from the same manifest).

Blocking, thread-safe: engine calls run in the batcher's threads, each borrowing one pooled
connection for one request/answer.  Every failure (worker gone, timeout, refused request)
raises :class:`WorkerError`, which the app answers as a degraded recall (``tower_error``,
or ``tower_timeout`` when the request's budget ran out first) with the popular items.
A broken connection is dropped and the next call reconnects, so a restarted worker is
picked up without restarting the service.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from contracts import tower_wire as wire
from contracts.manifest import ArtifactError
from contracts.tower import INPUT_ITEM_SEQ, INPUT_TIME_LAG, OUTPUT_USER_EMBEDDING

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker could not be reached or refused the request."""


class WorkerRefused(WorkerError):
    """The worker answered with an error (``code``: the wire's error code)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"tower worker refused: {code}: {detail}")
        self.code = code


class _Connection:
    """One pooled socket with its receive buffer and the timeout last set on it."""

    __slots__ = ("sock", "reader", "timeout_s")

    def __init__(self, sock: socket.socket, spin_us: int) -> None:
        self.sock = sock
        self.reader = wire.FrameReader(sock, spin_us=spin_us)
        self.timeout_s: float | None = None

    def close(self) -> None:
        self.sock.close()


class WorkerExited(WorkerError):
    """The worker's process ended while :func:`wait_healthy` waited for it."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"the tower worker exited with {returncode}")
        self.returncode = returncode


class TowerWorkerClient:
    """Pooled connections to one worker socket; ``timeout_s`` bounds each request.

    ``spin_us``: how long a request busy-polls for the answer before it blocks
    (``contracts.tower_wire.FrameReader``; ``Settings.tower_worker_spin_us`` says why and
    how long); 0 = block at once; None = ``wire.default_spin_us()``."""

    def __init__(
        self,
        socket_path: Path | str,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 0.2,
        max_idle: int = 8,
        spin_us: int | None = None,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self.spin_us = wire.default_spin_us() if spin_us is None else spin_us
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        # Encoded request headers by (header, shapes): embed requests repeat them.
        self._heads: dict[Any, bytes] = {}

    # ------------------------------------------------------------------ connections

    def _connect(self) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout_s)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise WorkerError(f"cannot connect to the tower worker at {self.socket_path}: "
                              f"{exc}") from exc  # fmt: skip
        return _Connection(sock, self.spin_us)

    def _borrow(self) -> tuple[_Connection, bool]:
        """A connection and whether it came from the pool (one lock per request)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ requests

    def request(
        self,
        header: dict[str, Any],
        arrays: list[tuple[str, np.ndarray]] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One round trip; raises :class:`WorkerError` on any failure.

        The frame goes out with one ``sendmsg`` of its parts (the arrays are not copied) and
        the answer comes in through the connection's buffer, usually with one ``recv``: at
        B = 1 the round trip is per-call work, not bytes (docs/operations.md)."""
        parts, total = wire.frame_parts(header, arrays or [], self._heads)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        # One retry on a pooled connection only: an idle connection may have been closed
        # by a worker restart since it was last used; a fresh one failing is final.
        for attempt in range(2):
            conn, pooled = self._borrow()
            try:
                if conn.timeout_s != timeout:  # settimeout is a syscall: only on a change
                    conn.sock.settimeout(timeout)
                    conn.timeout_s = timeout
                wire.send_parts(conn.sock, parts, total)
                answer, out = conn.reader.read()
            except (wire.PeerClosed, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if pooled and attempt == 0:
                    continue
                raise WorkerError(f"tower worker connection lost: {exc}") from exc
            except (OSError, wire.FrameError) as exc:  # timeout, garbage: drop the stream
                conn.close()
                raise WorkerError(f"tower worker request failed: {type(exc).__name__}: "
                                  f"{exc}") from exc  # fmt: skip
            if answer.get("error") == "bad_frame":
                conn.close()
            else:
                self._give_back(conn)
            if not answer.get("ok"):
                raise WorkerRefused(str(answer.get("error")), str(answer.get("detail")))
            return answer, out
        raise AssertionError("unreachable")

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request({"op": wire.OP_HEALTH}, timeout_s=timeout_s)[0]

    def load(self, artifacts: Path, model_version: str, timeout_s: float) -> dict[str, Any]:
        """Ask the worker to hold ``model_version`` from ``artifacts`` (may compile: slow)."""
        header = {"op": wire.OP_LOAD, "artifacts": str(artifacts), "model_version": model_version}
        return self.request(header, timeout_s=timeout_s)[0]

    def embed(self, model_version: str, item_seq: np.ndarray, time_lag: np.ndarray) -> np.ndarray:
        header = {"op": wire.OP_EMBED, "model_version": model_version}
        answer, out = self.request(header, [(INPUT_ITEM_SEQ, item_seq), (INPUT_TIME_LAG, time_lag)])
        embedding = out.get(OUTPUT_USER_EMBEDDING)
        if (
            answer.get("model_version") != model_version
            or embedding is None
            or embedding.shape[0] != item_seq.shape[0]
        ):
            raise WorkerError("tower worker answered another version or shape")
        return embedding


def wait_healthy(
    client: TowerWorkerClient,
    deadline_s: float,
    proc: subprocess.Popen[Any] | None = None,
    stop: threading.Event | None = None,
    interval_s: float = 0.1,
) -> dict[str, Any] | None:
    """Ask the worker for its health until it answers: its answer, or None when ``stop``
    was set.  Tried at least once (``deadline_s`` = 0: exactly once); between tries,
    ``interval_s`` (woken early by ``stop``).

    Raises :class:`WorkerExited` as soon as ``proc`` (the worker's process, when the caller
    started it) has ended, instead of waiting out the deadline; the last
    :class:`WorkerError` once ``deadline_s`` has passed.  One helper for every "wait until
    the worker is up" (``t2diff serve``'s child, the benchmark, ``--ping``)."""
    deadline = time.monotonic() + deadline_s
    while True:
        if stop is not None and stop.is_set():
            return None
        if proc is not None and proc.poll() is not None:
            raise WorkerExited(proc.returncode)
        try:
            return client.health()
        except WorkerError:
            if time.monotonic() >= deadline:
                raise
        if stop is not None:
            stop.wait(interval_s)
        else:
            time.sleep(interval_s)


def attach_worker(
    socket_path: Path | str,
    artifacts_dir: Path,
    model_version: str,
    embedding_dim: int,
    timeout_s: float,
    load_timeout_s: float,
    spin_us: int | None = None,
) -> TowerWorkerClient:
    """A client for a worker that holds ``model_version`` (asked to load it from
    ``artifacts_dir`` when it does not yet), or :class:`WorkerError`.

    A worker that loads the directory but reports another version, or another embedding
    size, is refused (:class:`WorkerRefused` ``version_mismatch``): a service must never
    score one version's user vectors against another's items.
    """
    client = TowerWorkerClient(socket_path, timeout_s, spin_us=spin_us)
    try:
        health = client.health(timeout_s=max(timeout_s, 1.0))
        if model_version not in health.get("versions", []):
            log.info("tower worker holds %s; asking it to load %s from %s",
                     health.get("versions"), model_version, artifacts_dir)  # fmt: skip
            loaded = client.load(Path(artifacts_dir).resolve(), model_version, load_timeout_s)
            if model_version not in loaded.get("versions", []):
                raise WorkerRefused("version_mismatch", f"worker holds {loaded.get('versions')}")
            health = client.health(timeout_s=max(timeout_s, 1.0))
        if health.get("model_version") == model_version and health.get("embedding_dim") not in (
            None,
            embedding_dim,
        ):
            raise WorkerRefused("version_mismatch", "embedding size differs from the manifest")
    except BaseException:
        client.close()
        raise
    return client


@dataclass(frozen=True)
class TowerBackend:
    """Which path computes the user tower (``Settings.tower_backend`` and friends).

    ``onnx``: ONNX Runtime in the service (CUDA EP when the build has it, else CPU).
    ``worker``: the tower worker at ``socket_path``; a worker that cannot be reached when a
    version loads makes that load fail (the tower is not ready; a hot swap keeps the old
    version).  ``auto``: the worker when a socket is configured and it answers at load
    time, else ONNX Runtime, with a warning.  A worker that answers with another model
    version is refused in both modes.
    """

    backend: Literal["auto", "onnx", "worker"] = "onnx"
    socket_path: Path | None = None
    timeout_s: float = 1.0
    load_timeout_s: float = 600.0
    spin_us: int | None = None  # None: wire.default_spin_us()

    @classmethod
    def from_settings(cls, settings: Settings) -> TowerBackend:
        return cls(
            settings.tower_backend,
            settings.tower_worker_socket,
            settings.tower_worker_timeout_ms / 1000,
            settings.tower_worker_load_timeout_s,
            settings.tower_worker_spin_us,
        )

    def attach(
        self, artifacts_dir: Path, model_version: str, embedding_dim: int
    ) -> TowerWorkerClient | None:
        """The worker client to use, or None for ONNX Runtime; ``ArtifactError`` when the
        configured worker must be used and cannot be, or holds another version."""
        if self.backend == "onnx" or (self.backend == "auto" and self.socket_path is None):
            return None
        if self.socket_path is None:
            raise ArtifactError("TOWER_BACKEND=worker needs TOWER_WORKER_SOCKET")
        try:
            client = attach_worker(self.socket_path, artifacts_dir, model_version,
                                   embedding_dim, self.timeout_s, self.load_timeout_s,
                                   self.spin_us)  # fmt: skip
        except WorkerRefused as exc:
            if exc.code == "version_mismatch" or self.backend == "worker":
                raise ArtifactError(f"tower worker: {exc}") from exc
            log.warning("tower worker unusable (%s): using ONNX Runtime", exc)
            return None
        except WorkerError as exc:
            if self.backend == "worker":
                raise ArtifactError(str(exc)) from exc
            log.warning("tower worker unreachable (%s): using ONNX Runtime", exc)
            return None
        log.info("user tower %s served by the tower worker at %s", model_version,
                 self.socket_path)  # fmt: skip
        return client
