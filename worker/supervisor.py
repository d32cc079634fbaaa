"""``t2diff serve --tower-worker auto|on|off``: the tower worker as a child of the serve
process, so that a bare ``t2diff serve`` on a GPU box computes the user tower with the fused
kernel (``worker.server``) instead of ONNX Runtime.

* ``auto`` (the default, ``T2DIFF_TOWER_WORKER``): start a worker when torch is installed
  (``importlib.util.find_spec``: this process never imports torch) and a CUDA GPU is
  visible (:func:`cuda_gpu`); the worker is told ``--device cuda``, so a torch that cannot
  use the GPU makes it fail (then ONNX Runtime serves) instead of running eager on the CPU,
  which would be slower than ONNX Runtime.
* ``on``: always start one (``--device auto``: eager on a CPU; for tests and CPU trials).
* ``off``: never.

No worker is started when the settings already choose: ``TOWER_BACKEND=onnx``, or a
``TOWER_WORKER_SOCKET`` (a sidecar worker, as in the GPU compose override) in ``auto``.

The child gets the serve's artifacts directory and may load any export beside the one it
starts with (``--allow-root``: the parent of the resolved directory, where ``t2diff promote``
puts new versions), so a hot swap asks it to ``load`` the promoted version as with a
sidecar.  Its socket lives in a private (0700) directory.  The serve process waits for the
worker's health answer (bounded), then serves with ``TOWER_BACKEND=auto`` + the socket; if the
worker does not come up, the reason is logged and ONNX Runtime serves.  A worker that dies
while serving is restarted (with backoff); meanwhile the service answers degraded
(``tower_error``) and its client reconnects by itself.  On exit the child is stopped
(SIGTERM, then SIGKILL) and its socket directory removed; a worker whose parent died
without stopping it (SIGKILL) stops by itself (``--parent-pid``).

Only the standard library and the torch-free wire client are imported here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("t2diff.serve")

MODES = ("auto", "on", "off")
ENV_MODE = "T2DIFF_TOWER_WORKER"
# Import torch + load the checkpoint + (on a GPU) compile the kernel and capture its CUDA
# graphs: 5 s warm, 13-19 s with a cold Triton cache on the H100; a busy CPU box is slower.
ENV_START_TIMEOUT = "T2DIFF_TOWER_WORKER_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# AF_UNIX paths are limited to 107 bytes; leave room for the random directory name.
MAX_SOCKET_DIR_CHARS = 60
SOCKET_NAME = "tower.sock"


def torch_installed() -> bool:
    """Whether torch can be imported, without importing it (this process stays torch-free)."""
    return importlib.util.find_spec("torch") is not None


def cuda_gpu() -> tuple[bool, str]:
    """Whether a CUDA GPU is visible, and why.

    ``nvidia-smi -L`` listing a GPU is the test: it proves that the driver answers, which a
    device node alone does not (a container can have /dev/nvidia0 without a working driver
    or with a mismatched one).  Only when nvidia-smi is not installed (a container given
    the ``compute`` capability alone has no nvidia-smi) is ``/dev/nvidia0`` taken as the
    sign.  ``CUDA_VISIBLE_DEVICES`` set to nothing (or -1) hides every GPU from CUDA.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if Path("/dev/nvidia0").exists():
            return True, "/dev/nvidia0 (nvidia-smi is not installed)"
        return False, "no nvidia-smi and no /dev/nvidia0"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi -L failed: {exc}"
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        detail = (listed.stderr or listed.stdout).strip()[:200]
        return False, f"nvidia-smi -L listed no GPU (exit {listed.returncode}: {detail})"
    return True, gpus[0]


def decide(mode: str, settings: Settings) -> tuple[str | None, str]:
    """The worker's ``--device`` (None: start no worker) and the reason, for the log."""
    if mode not in MODES:
        raise ValueError(f"--tower-worker must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return None, "--tower-worker off"
    if settings.tower_backend == "onnx":
        return None, "TOWER_BACKEND=onnx"
    if mode == "on":
        return "auto", "--tower-worker on"
    if settings.tower_worker_socket is not None:
        return (
            None,
            f"TOWER_WORKER_SOCKET is set ({settings.tower_worker_socket}): a worker runs beside",
        )
    if not torch_installed():
        return None, "torch is not installed"
    visible, why = cuda_gpu()
    if not visible:
        return None, f"no CUDA GPU ({why})"
    return "cuda", f"torch is installed and a GPU is visible ({why})"


def _socket_dir() -> Path:
    """A new private (0700, mkdtemp) directory for the socket: $XDG_RUNTIME_DIR when set
    and short enough, else the temporary directory, else /tmp."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"):
        if base and os.path.isdir(base) and len(base) <= MAX_SOCKET_DIR_CHARS:
            try:
                return Path(tempfile.mkdtemp(prefix="t2diff-tower-", dir=base))
            except OSError:
                continue
    raise OSError("no writable directory with a path short enough for a Unix socket")


class TowerWorkerChild:
    """``python -m worker.server`` as this process's child, restarted if it dies."""

    def __init__(
        self,
        artifacts_dir: Path,
        device: str,
        start_timeout_s: float,
        spin_us: int | None = None,
    ) -> None:
        artifacts = Path(artifacts_dir).absolute()
        self.artifacts = artifacts
        # Exports beside the served one (new versions of a release root) may be loaded.
        self.allow_root = Path(os.path.realpath(artifacts)).parent
        self.device = device
        self.start_timeout_s = start_timeout_s
        # The service's TOWER_WORKER_SPIN_US: the worker polls for the next request as long
        # as the service's client polls for the answer (Settings says why); None: the
        # worker's default, resolved on this machine as the service's is.
        self.spin_us = spin_us
        self.socket_dir = _socket_dir()
        self.socket_path = self.socket_dir / SOCKET_NAME
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "worker.server",
            "--artifacts", str(self.artifacts), "--socket", str(self.socket_path),
            "--device", self.device, "--allow-root", str(self.allow_root),
            "--parent-pid", str(os.getpid()),
            *(["--spin-us", str(self.spin_us)] if self.spin_us is not None else []),
        ]  # fmt: skip

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The package root on the child's path, so that ``-m worker.server`` imports
        # this checkout's code whatever the working directory is.
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        # Its own session: a Ctrl-C in the terminal stops the service first (uvicorn's
        # graceful shutdown still uses the worker), then this class stops the worker.
        # Output is inherited: the worker's log lines go where the service's go.
        return subprocess.Popen(self.command(), env=env, start_new_session=True)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> str | None:
        """None once the worker answers a health frame; else why it did not."""
        from service.remote_tower import TowerWorkerClient, WorkerError, WorkerExited, wait_healthy

        client = TowerWorkerClient(self.socket_path, timeout_s=5.0, spin_us=0)
        try:
            health = wait_healthy(client, self.start_timeout_s, proc=proc, stop=self._stopping,
                                  interval_s=0.2)  # fmt: skip
        except WorkerExited as exc:
            return f"the worker exited with {exc.returncode} (its log is above)"
        except WorkerError:
            return f"no answer within {self.start_timeout_s:g} s"
        finally:
            client.close()
        if health is None:
            return "stopping"
        log.info(
            "tower worker pid %d ready on %s: %s path=%s precision=%s device=%s",
            proc.pid, self.socket_path, health.get("versions"), health.get("path"),
            health.get("precision"), health.get("device"),
        )  # fmt: skip
        return None

    def start(self) -> bool:
        """Start the worker and wait for it; False (logged, cleaned up) when it failed."""
        log.info("starting the tower worker: %s", " ".join(self.command()))
        try:
            proc = self._spawn()
        except OSError as exc:
            log.warning("tower worker could not start (%s): serving with ONNX Runtime", exc)
            self.stop()
            return False
        with self._lock:
            self.proc = proc
        log.info("tower worker started: pid %d, socket %s", proc.pid, self.socket_path)
        failure = self._wait_ready(proc)
        if failure is not None:
            log.warning("tower worker did not come up (%s): serving with ONNX Runtime", failure)
            self.stop()
            return False
        self._supervisor = threading.Thread(
            target=self._supervise, name="tower-worker-supervisor", daemon=True
        )
        self._supervisor.start()
        return True

    def _supervise(self) -> None:
        """Restart a worker that died while serving.  Until the new one answers, the
        service's requests degrade (``tower_error``); its client reconnects by itself."""
        restarts = 0
        while True:
            with self._lock:
                proc = self.proc
            if proc is None:
                return
            returncode = proc.wait()
            if self._stopping.is_set():
                return
            delay = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
            log.error("tower worker pid %d exited with %d while serving: restarting in %g s",
                      proc.pid, returncode, delay)  # fmt: skip
            if self._stopping.wait(delay):
                return
            restarts += 1
            try:
                new = self._spawn()
            except OSError as exc:
                log.error("tower worker restart failed: %s", exc)
                continue
            with self._lock:
                if self._stopping.is_set():
                    new.terminate()
                    new.wait(STOP_TIMEOUT_S)
                    return
                self.proc = new
            failure = self._wait_ready(new)
            if failure is None:
                restarts = 0  # a worker that came up resets the backoff
            elif failure != "stopping":
                log.error("restarted tower worker did not come up: %s", failure)

    def stop(self) -> None:
        """Stop the worker (SIGTERM, SIGKILL after STOP_TIMEOUT_S) and remove its socket
        directory; safe to call twice."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("tower worker pid %d ignored SIGTERM: killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(STOP_TIMEOUT_S)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class Terminated(BaseException):
    """SIGTERM arrived while a tower worker child runs: unwinds to the cleanup, after which
    :meth:`resend` ends the process by the signal as a serve without a worker would."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum

    def resend(self) -> None:
        signal.signal(self.signum, signal.SIG_DFL)
        signal.raise_signal(self.signum)


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextmanager
def tower_worker(mode: str, settings: Settings) -> Iterator[Settings]:
    """The settings to serve with: ``settings`` itself, or, with a worker started and
    answering, ``TOWER_BACKEND`` (auto unless worker was asked) + the worker's socket.
    The worker is stopped when the block ends."""
    device, reason = decide(mode, settings)
    if device is None:
        log.info("no tower worker started: %s", reason)
        yield settings
        return
    log.info("starting a tower worker: %s", reason)
    # SIGTERM unwinds through `finally` (the worker is stopped, its socket removed) instead
    # of ending the process at once: while the worker starts, and after uvicorn's graceful
    # shutdown, which re-raises the signal it caught under the handler found before it ran.
    previous = signal.signal(signal.SIGTERM, _terminated)
    child = TowerWorkerChild(settings.artifacts_dir, device, _start_timeout(),
                             settings.tower_worker_spin_us)  # fmt: skip
    try:
        up = child.start()
        if not up:
            yield settings
            return
        backend = "worker" if settings.tower_backend == "worker" else "auto"
        # The environment too: with WORKERS > 1 uvicorn's processes read their settings
        # from it, not from this object.
        os.environ["T2DIFF_TOWER_BACKEND"] = backend
        os.environ["T2DIFF_TOWER_WORKER_SOCKET"] = str(child.socket_path)
        yield settings.model_copy(
            update={"tower_backend": backend, "tower_worker_socket": child.socket_path}
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        child.stop()
        log.info("tower worker stopped")


def _start_timeout() -> float:
    raw = os.environ.get(ENV_START_TIMEOUT)
    try:
        value = float(raw) if raw else DEFAULT_START_TIMEOUT_S
    except ValueError:
        log.warning("%s=%r is not a number: using %g s", ENV_START_TIMEOUT, raw,
                    DEFAULT_START_TIMEOUT_S)  # fmt: skip
        return DEFAULT_START_TIMEOUT_S
    return value if value > 0 else DEFAULT_START_TIMEOUT_S
