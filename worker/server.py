"""The tower worker: a process that owns torch (and the fused Triton kernel on a GPU) and
serves user-tower batches to the recall service over a Unix domain socket.

Why a process: ``service/`` never imports torch (serving installs without it), and the
fastest correct GPU path is ``model.fused_tower.FusedTower`` (all T U-Net steps in one
kernel), which is torch + Triton.  ONNX Runtime's CUDA EP runs the same graph ~7x slower
(docs/results/inference.md, "GPU (H100)").  The service keeps its micro-batcher, budgets
and fallbacks; its client (``service.remote_tower``) sends the padded ``item_seq`` /
``time_lag`` it would give ONNX Runtime and gets the embeddings back.  Wire format:
``contracts.tower_wire``.

    python -m worker.server --artifacts artifacts/current --socket /run/t2diff/tower.sock

The compute (what runs on which ``--path`` and precision, the versions held, the
coalescing of concurrent requests) is ``worker.tower``; this module is the process around
it: the socket server, its signals and parent watch, and the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import socketserver
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts import tower_wire as wire
from worker import tower
from worker.tower import DEFAULT_PRECISION, PARITY_TOL, PATHS, RequestError, TowerWorker

# The same logger as worker.tower's: one name for the whole worker process.
log = logging.getLogger("t2diff.tower_worker")


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        worker = self.server.worker
        # One buffered reader per connection: a frame usually arrives with one recv, and
        # a request header seen before (same version and batch size) is not parsed again.
        # spin_us: after each answer the next request is busy-polled for that long before
        # the recv blocks, so a steady stream of requests never waits on a sleeping core.
        reader = wire.FrameReader(sock, cache_headers=True, spin_us=self.server.spin_us)
        while True:
            try:
                header, arrays = reader.read()
            except wire.PeerClosed:
                return
            except (wire.FrameError, OSError) as exc:
                log.warning("bad frame, closing the connection: %s", exc)
                self._send(sock, {"ok": False, "error": "bad_frame", "detail": str(exc)})
                return
            out_arrays: list[tuple[str, np.ndarray]] = []
            try:
                op = header.get("op")
                if op == wire.OP_EMBED:
                    answer, embedding = worker.embed(header, arrays)
                    out_arrays = [("user_embedding", np.ascontiguousarray(embedding, np.float32))]
                elif op == wire.OP_HEALTH:
                    answer = worker.health()
                elif op == wire.OP_LOAD:
                    answer = worker.load(header)
                else:
                    raise RequestError("bad_request", f"unknown op {op!r}")
            except RequestError as exc:
                answer = {"ok": False, "error": exc.code, "detail": str(exc)}
            except Exception as exc:  # a bug or a CUDA failure: answer, keep serving
                log.exception("request failed")
                answer = {"ok": False, "error": "internal", "detail": f"{type(exc).__name__}"}
            if not self._send(sock, answer, out_arrays):
                return

    @staticmethod
    def _send(
        sock: socket.socket, header: dict[str, Any], arrays: list[tuple[str, np.ndarray]] = ()
    ) -> bool:
        try:
            # One sendmsg of the frame's parts: the embedding is not copied into a frame.
            wire.send_frame(sock, header, arrays)
            return True
        except OSError:
            return False  # the client went away (e.g. its timeout): nothing to answer


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # a client holding its connection open never blocks shutdown
    # listen() backlog: socketserver's default of 5 refused connections (EAGAIN on a Unix
    # socket) when 32 clients connected at once on the H100; service processes open
    # connections in bursts when a batch of threads starts.
    request_queue_size = 256

    def __init__(self, path: str, worker: TowerWorker, spin_us: int = 0) -> None:
        self.worker = worker
        self.spin_us = spin_us
        super().__init__(path, _Handler)


def serve(
    worker: TowerWorker,
    socket_path: Path,
    parent_pid: int | None = None,
    spin_us: int = 0,
) -> None:
    """Serve until SIGTERM/SIGINT; the socket file is created 0660 and removed at exit.

    ``parent_pid``: also stop when that process is no longer this one's parent (the
    ``t2diff serve`` that started this worker died without stopping it, e.g. SIGKILL), so
    that no orphaned worker holds the GPU.  ``spin_us``: see ``--spin-us``."""
    socket_path = Path(socket_path)
    worker.spin_us = spin_us
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists() or socket_path.is_symlink():
        # A stale socket of a previous worker; never delete anything that is not a socket.
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise SystemExit(f"{socket_path} exists and is not a socket")
        socket_path.unlink()
    old_umask = os.umask(0o117)
    try:
        server = _Server(str(socket_path), worker, spin_us)
    finally:
        os.umask(old_umask)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if parent_pid is not None:

        def watch_parent() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            log.warning("parent %d is gone: stopping", parent_pid)
            server.shutdown()

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    log.info("serving on %s (pid %d)", socket_path, os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        socket_path.unlink(missing_ok=True)


# The service's setting of the same name: a sidecar worker given the service's environment
# polls as long as its clients do.
SPIN_ENV = "T2DIFF_TOWER_WORKER_SPIN_US"


def _default_spin_us() -> int:
    """$T2DIFF_TOWER_WORKER_SPIN_US, else ``wire.default_spin_us()`` (3000 µs on a machine
    of 4 cores or more, else 0), as the service resolves its setting."""
    raw = os.environ.get(SPIN_ENV, "").strip()
    try:
        return max(0, int(raw)) if raw else wire.default_spin_us()
    except ValueError:
        log.warning("%s=%r is not an integer: using the default", SPIN_ENV, raw)
        return wire.default_spin_us()


def main(argv: list[str] | None = None) -> None:
    # --help shows what runs (the compute's own page) below the process's.
    description = f"{__doc__}\n{tower.__doc__}"
    parser = argparse.ArgumentParser(prog="python -m worker.server", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--artifacts", type=Path, help="an export directory (required to serve)")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket path")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    parser.add_argument("--path", default="auto", choices=PATHS)
    parser.add_argument("--precision", default=DEFAULT_PRECISION,
                        help="fused kernel: tf32x3tail (default: tf32 steps, the last "
                             "--exact-tail in tf32x3; parity checked at load, else tf32x3) | "
                             "tf32x3 (parity) | ieee | tf32 | bf16")  # fmt: skip
    parser.add_argument("--exact-tail", type=int, default=5,
                        help="tf32x3tail: reverse steps at the end run in tf32x3")  # fmt: skip
    parser.add_argument("--parity-tol", type=float, default=PARITY_TOL,
                        help="largest max |diff| against eager accepted at load")  # fmt: skip
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--max-bucket", type=int, default=256,
                        help="largest CUDA graph batch; larger requests are split")  # fmt: skip
    parser.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (debugging)")
    parser.add_argument("--keep-versions", type=int, default=2)
    parser.add_argument("--no-coalesce", action="store_true",
                        help="run concurrent requests one by one instead of as one batch")  # fmt: skip
    parser.add_argument("--allow-root", type=Path, default=None,
                        help="load requests may name exports under this directory only "
                             "(default: the parent of --artifacts)")  # fmt: skip
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process is gone (set by `t2diff serve`)")  # fmt: skip
    parser.add_argument("--spin-us", type=int, default=_default_spin_us(),
                        help="after each answer, busy-poll a connection for its next request "
                             "this long (µs) before blocking; 0 = block at once (default: "
                             f"${SPIN_ENV}, else {wire.DEFAULT_SPIN_US} with >= "
                             f"{wire.SPIN_MIN_CPUS} usable cores, else 0)")  # fmt: skip
    parser.add_argument("--ping", action="store_true",
                        help="ask the worker at --socket for its health; exit 0 when it answers "
                             "(a container health check)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.ping:
        from worker.ping import ping

        raise SystemExit(ping(args.socket))
    if args.artifacts is None:
        parser.error("--artifacts is required to serve")
    if args.exact_tail < 1:
        parser.error(f"--exact-tail must be >= 1, got {args.exact_tail}")
    if not args.parity_tol > 0:  # also refuses nan
        parser.error(f"--parity-tol must be > 0, got {args.parity_tol}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # The attention half's matmuls in fp32 (parity with ONNX Runtime and eager).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    worker = TowerWorker(
        args.artifacts,
        device,
        allow_root=args.allow_root,
        keep_versions=args.keep_versions,
        coalesce=not args.no_coalesce,
        path=args.path,
        precision=args.precision,
        exact_tail=args.exact_tail,
        parity_tol=args.parity_tol,
        num_warps=args.num_warps,
        max_bucket=args.max_bucket,
        graphs=not args.no_graphs,
    )
    serve(worker, args.socket, parent_pid=args.parent_pid, spin_us=max(0, args.spin_us))


if __name__ == "__main__":
    main()
