"""The tower worker (``worker.server``) and the service's client backend
(``service.remote_tower``), with real parts: a tiny T2Diff exported as ``t2diff export``
does (ONNX + the torch checkpoint), the worker as a real process on a real Unix socket,
ONNX Runtime, FAISS and redis-server.

* The worker (CPU, eager reference; and the fused Triton kernel under the interpreter)
  answers the ONNX Runtime runner's embeddings within 1e-4 for the same inputs.
* The service with ``TOWER_BACKEND=worker`` answers ``/recall`` end to end, like ONNX.
* The worker killed mid-stream: degraded answers (``tower_error``), no 5xx; a restarted
  worker is picked up again.  A dead worker at startup: ``auto`` falls back to ONNX
  Runtime, ``worker`` refuses to load.
* Version mismatches are refused; a hot swap loads the new version into the worker.
* Malformed frames are rejected and the worker keeps serving.
* Busy-polling (``--spin-us``, the client's ``spin_us``) on and off: the same answers; a
  stopped worker still times a spinning request out, a killed one still ends it.
* ``wait_healthy``: a worker process that exits ends the wait at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import deploy_versions, export_tiny_t2diff, point_current
from fastapi.testclient import TestClient
from model_fixtures import perturbed_t2diff
from service_fixtures import point_link

from contracts import manifest as mf
from contracts import tower_wire as wire
from contracts.tower import pad_batch
from model.t2diff import T2Diff
from service.app import create_app
from service.remote_tower import (
    TowerBackend,
    TowerWorkerClient,
    WorkerError,
    WorkerExited,
    WorkerRefused,
    wait_healthy,
)
from service.settings import Settings
from service.tower import UserTowerRunner

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
N_ITEMS = 40  # perturbed_t2diff's item count
# The fused kernel's shapes (3 levels, channels powers of two >= 16), tiny for the
# interpreter: L = 13 -> 7 -> 4 exercises ceil-mode pooling.
TINY = {"dim": 16, "unet_width": 16, "max_seq_len": 13, "session_len": 4, "diffusion_steps": 3}
NOISE_SEED = 11
START_TIMEOUT_S = 180.0  # import torch + load on a busy 2-core box; not a time assertion


def item_name(row: int) -> str:
    return f"film-{row}"


def export_version(out_dir: Path, model: T2Diff, version: str) -> Path:
    """What ``t2diff export`` writes for ``model`` (ONNX tower, torch checkpoint, items,
    manifest), without a training run."""
    return export_tiny_t2diff(
        out_dir, model, version, noise_seed=NOISE_SEED, item_name=item_name, torch_tower=True
    )


class Worker:
    """``python -m worker.server`` as a child process on a fresh socket."""

    def __init__(self, artifacts: Path, *extra: str, env: dict[str, str] | None = None,
                 sock: Path | None = None) -> None:  # fmt: skip
        # A short path: AF_UNIX paths are limited to ~107 bytes (pytest's tmp paths are long).
        self.sock = sock or Path(tempfile.mkdtemp(prefix="t2tw-", dir="/tmp")) / "tower.sock"
        command = [sys.executable, "-m", "worker.server", "--artifacts", str(artifacts),
                   "--socket", str(self.sock), "--device", "cpu", *extra]  # fmt: skip
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        client = TowerWorkerClient(self.sock, timeout_s=5.0, spin_us=0)
        try:
            health = wait_healthy(client, START_TIMEOUT_S, proc=self.proc, interval_s=0.2)
        except WorkerExited as exc:
            raise RuntimeError(f"worker exited {exc.returncode}: {self.output()}") from None
        except WorkerError:
            self.stop()
            raise RuntimeError(f"worker did not start: {self.output()}") from None
        finally:
            client.close()
        assert health is not None
        self.health = health

    def output(self) -> str:
        if self.proc.poll() is None or self.proc.stdout is None:
            return ""
        return self.proc.stdout.read()[-3000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two versions (different weights), each with its FAISS index; ``current`` -> a."""
    seeds = {"tw-a": 21, "tw-b": 22}
    root = deploy_versions(
        tmp_path_factory.mktemp("worker-deploy"),
        lambda out, v: export_version(out, perturbed_t2diff(TINY, seeds[v]), v),
        tuple(seeds),
    )
    point_current(root, "tw-a")
    return root


@pytest.fixture(scope="module")
def worker(deployment: Path) -> Iterator[Worker]:
    proc = Worker(deployment / "artifacts" / "current", "--spin-us", "0")
    yield proc
    proc.stop()


def _inputs(runner: UserTowerRunner, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens, stamps = [], []
    for _ in range(batch):
        n = int(rng.integers(1, runner.max_seq_len + 4))  # some longer than the window
        tokens.append(rng.integers(1, N_ITEMS + 1, n).tolist())
        stamps.append((1_700_000_000.0 + np.cumsum(rng.exponential(4000.0, n))).tolist())
    return pad_batch(tokens, stamps, 1_700_100_000.0, runner.max_seq_len)


def _ort_embedding(runner: UserTowerRunner, item_seq: np.ndarray, time_lag: np.ndarray):
    assert runner.session is not None
    (out,) = runner.session.run(
        None, {"item_seq": item_seq, "time_lag": time_lag, "noise": runner.noise}
    )
    return out


# --------------------------------------------------------------------------- parity


def test_worker_answers_the_onnx_runners_embeddings(deployment: Path, worker: Worker) -> None:
    artifacts = deployment / "artifacts" / "tw-a"
    ort_runner = UserTowerRunner(artifacts)
    assert ort_runner.worker is None and ort_runner.session is not None
    client = TowerWorkerClient(worker.sock, timeout_s=30.0)
    assert worker.health["path"] == "eager" and worker.health["versions"] == ["tw-a"]
    for batch in (1, 3, 8):
        item_seq, time_lag = _inputs(ort_runner, batch, seed=batch)
        got = client.embed("tw-a", item_seq, time_lag)
        want = _ort_embedding(ort_runner, item_seq, time_lag)
        assert got.shape == (batch, TINY["dim"]) and got.dtype == np.float32
        assert np.abs(got - want).max() < TOL
    # The same through the runner's worker backend (what the service calls).
    remote = UserTowerRunner(artifacts, backend=TowerBackend("worker", worker.sock))
    assert remote.worker is not None and remote.session is None
    tokens = [[1, 2, 3], [5], list(range(1, 30))]
    stamps = [[1.0e9, 1.1e9, 1.2e9], [1.0e9], [1.0e9 + 60 * i for i in range(29)]]
    got = remote.embed_tokens(tokens, stamps, 1.3e9)
    want = ort_runner.embed_tokens(tokens, stamps, 1.3e9)
    assert np.abs(got - want).max() < TOL
    client.close()


def test_fused_worker_under_the_triton_interpreter(deployment: Path) -> None:
    pytest.importorskip("triton", reason="triton is not installed (the dev extra brings it)")
    artifacts = deployment / "artifacts" / "tw-b"
    fused = Worker(artifacts, "--path", "fused", env={"TRITON_INTERPRET": "1"})
    try:
        # The default, tf32x3tail, with TINY's 3 steps all in its exact tail.
        assert fused.health["path"] == "fused" and fused.health["precision"] == "tf32x3tail"
        # The worker checked itself against eager at load (refuses > 1e-4 at this precision).
        assert fused.health["parity_max_abs_diff"] < TOL
        ort_runner = UserTowerRunner(artifacts)
        client = TowerWorkerClient(fused.sock, timeout_s=120.0)
        for batch in (1, 3):
            item_seq, time_lag = _inputs(ort_runner, batch, seed=10 + batch)
            got = client.embed("tw-b", item_seq, time_lag)
            assert np.abs(got - _ort_embedding(ort_runner, item_seq, time_lag)).max() < TOL
        client.close()
    finally:
        fused.stop()


def test_tf32_steps_that_miss_parity_fall_back_to_tf32x3(deployment: Path) -> None:
    # One exact step of three: the two tf32 steps' rounding (nearest tf32 under the
    # interpreter too) moves TINY's random-weight tower by ~5e-5, over a limit of 1e-5; the
    # interpreter's tf32x3 multiplies in float32 (~1e-7), so the worker serves tf32x3 and
    # says so in its health answer.
    pytest.importorskip("triton", reason="triton is not installed (the dev extra brings it)")
    artifacts = deployment / "artifacts" / "tw-b"
    fused = Worker(artifacts, "--path", "fused", "--exact-tail", "1", "--parity-tol", "1e-5",
                   env={"TRITON_INTERPRET": "1"})  # fmt: skip
    try:
        assert fused.health["precision"] == "tf32x3"
        assert fused.health["parity_max_abs_diff"] < 1e-5
    finally:
        fused.stop()


@pytest.mark.parametrize(
    ("option", "value"), [("--exact-tail", "0"), ("--parity-tol", "0"), ("--parity-tol", "nan")]
)
def test_bad_precision_options_are_refused(
    deployment: Path, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.server import main

    sock = Path(tempfile.mkdtemp(prefix="t2tw-", dir="/tmp")) / "tower.sock"
    with pytest.raises(SystemExit) as exc:
        main(["--artifacts", str(deployment / "artifacts" / "tw-a"), "--socket", str(sock),
              option, value])  # fmt: skip
    assert exc.value.code == 2 and option in capsys.readouterr().err
    assert not sock.exists()  # refused before anything was loaded or bound


# --------------------------------------------------------------------------- the service


def _settings(root: Path, redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "artifacts_dir": root / "artifacts" / "current",
        "index_dir": root / "indexes" / "current",
        "redis_url": redis_url,
        "budget_ms": 3_000,
        "watch_interval_s": 0,
        "admin_token": "worker-token",
        "inference_concurrency": 2,
        "redis_breaker_open_ms": 200,
        # The CPU reference path on a busy 2-core box; a hang still fails the request.
        "tower_worker_timeout_ms": 30_000,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _write_history(client: TestClient, user: str, rows: list[int]) -> None:
    events = [
        {"user_id": user, "item_id": item_name(r), "timestamp": 1_700_000_000.0 + 600.0 * i}
        for i, r in enumerate(rows)
    ]
    assert client.post("/events", json={"events": events}).status_code == 200


def _recall(client: TestClient, user: str) -> dict:
    response = client.post("/recall", json={"user_id": user, "k": 15})
    assert response.status_code == 200, response.text
    return response.json()


def test_service_recalls_through_the_worker(
    deployment: Path, worker: Worker, redis_url: str
) -> None:
    via_worker = TestClient(
        create_app(
            _settings(
                deployment, redis_url, tower_backend="worker", tower_worker_socket=worker.sock
            )
        )  # fmt: skip
    )
    via_onnx = TestClient(create_app(_settings(deployment, redis_url, tower_backend="onnx")))
    rng = np.random.default_rng(3)
    with via_worker, via_onnx:
        assert via_worker.get("/readyz").status_code == 200
        for n in range(4):
            user = f"tw-user-{n}"
            _write_history(via_worker, user, rng.integers(0, N_ITEMS, 8).tolist())
            a, b = _recall(via_worker, user), _recall(via_onnx, user)
            assert not a["degraded"] and not a["cold_start"] and a["model_version"] == "tw-a"
            assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
            scores_a = np.array([i["score"] for i in a["items"]])
            scores_b = np.array([i["score"] for i in b["items"]])
            assert np.abs(scores_a - scores_b).max() < TOL


def test_worker_killed_mid_stream_degrades_then_recovers(deployment: Path, redis_url: str) -> None:
    own = Worker(deployment / "artifacts" / "current")
    app = TestClient(
        create_app(
            _settings(
                deployment,
                redis_url,
                tower_backend="worker",
                tower_worker_socket=own.sock,
            )
        )  # fmt: skip
    )
    try:
        with app:
            _write_history(app, "tw-kill", [1, 4, 9, 16])
            assert not _recall(app, "tw-kill")["degraded"]
            own.kill()
            for _ in range(5):
                body = _recall(app, "tw-kill")  # 200, never a 5xx
                assert body["degraded"] and body["degraded_reason"] == "tower_error"
                assert len(body["items"]) == 15  # popular items, seen ones excluded
                assert not {item_name(r) for r in (1, 4, 9, 16)} & {
                    i["item_id"] for i in body["items"]
                }
            metrics = app.get("/metrics").text
            assert 't2diff_degraded_total{reason="tower_error"}' in metrics
            # A new worker on the same socket is picked up without restarting the service.
            again = Worker(deployment / "artifacts" / "current", sock=own.sock)
            try:
                assert not _recall(app, "tw-kill")["degraded"]
            finally:
                again.stop()
    finally:
        own.stop()


def test_dead_worker_at_startup(deployment: Path, redis_url: str, caplog) -> None:
    missing = Path(tempfile.mkdtemp(prefix="t2tw-", dir="/tmp")) / "none.sock"
    artifacts = deployment / "artifacts" / "tw-a"
    with caplog.at_level("WARNING", logger="service.remote_tower"):
        runner = UserTowerRunner(artifacts, backend=TowerBackend("auto", missing))
    assert runner.worker is None and runner.session is not None  # ONNX Runtime instead
    assert "using ONNX Runtime" in caplog.text
    with pytest.raises(mf.ArtifactError, match="cannot connect"):
        UserTowerRunner(artifacts, backend=TowerBackend("worker", missing))
    with pytest.raises(mf.ArtifactError, match="needs TOWER_WORKER_SOCKET"):
        UserTowerRunner(artifacts, backend=TowerBackend("worker", None))
    # The app: not ready, with the reason, and no 5xx on /recall (503 not-ready).
    settings = _settings(deployment, redis_url, tower_backend="worker", tower_worker_socket=missing)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "tower" in ready.text


# --------------------------------------------------------------------------- versions


def test_version_mismatch_is_refused(deployment: Path, worker: Worker, tmp_path: Path) -> None:
    client = TowerWorkerClient(worker.sock, timeout_s=30.0)
    item_seq = np.zeros((1, TINY["max_seq_len"]), np.int64)
    item_seq[0, -1] = 3
    time_lag = np.zeros_like(item_seq, dtype=np.float32)
    with pytest.raises(WorkerRefused) as refused:
        client.embed("not-loaded", item_seq, time_lag)
    assert refused.value.code == "version_mismatch"
    # A directory that holds another version than the one asked for: refused, auto too.
    with pytest.raises(WorkerRefused) as refused:
        client.load(deployment / "artifacts" / "tw-b", "tw-c", timeout_s=60)
    assert refused.value.code == "version_mismatch"
    with pytest.raises(mf.ArtifactError, match="version_mismatch"):
        TowerBackend("auto", worker.sock).attach(deployment / "artifacts" / "tw-b", "tw-c", 16)
    # Exports outside the worker's artifact root are never read.
    outside = shutil.copytree(deployment / "artifacts" / "tw-b", tmp_path / "tw-b")
    with pytest.raises(WorkerRefused) as refused:
        client.load(outside, "tw-b", timeout_s=60)
    assert refused.value.code == "load_failed"
    assert client.health()["versions"] == ["tw-a"]
    client.close()


def test_hot_swap_loads_the_new_version_into_the_worker(deployment: Path, redis_url: str) -> None:
    own = Worker(deployment / "artifacts" / "current")
    settings = _settings(
        deployment, redis_url, tower_backend="worker", tower_worker_socket=own.sock
    )
    auth = {"Authorization": "Bearer worker-token"}
    try:
        with TestClient(create_app(settings)) as app:
            _write_history(app, "tw-swap", [2, 3, 5, 7, 11])
            on_a = _recall(app, "tw-swap")
            assert on_a["model_version"] == "tw-a" and not on_a["degraded"]
            for kind in ("indexes", "artifacts"):
                point_link(deployment / kind / "current", "tw-b")
            assert app.post("/admin/reload", headers=auth).json()["status"] == "reloaded"
            on_b = _recall(app, "tw-swap")
            assert on_b["model_version"] == "tw-b" and not on_b["degraded"]
            assert [i["score"] for i in on_a["items"]] != [i["score"] for i in on_b["items"]]
            health = TowerWorkerClient(own.sock, timeout_s=30.0).health()
            assert health["versions"] == ["tw-a", "tw-b"]  # the old one kept for in-flight
    finally:
        for kind in ("indexes", "artifacts"):
            point_link(deployment / kind / "current", "tw-a")
        own.stop()


# --------------------------------------------------------------------------- frames


def _raw(sock_path: Path, data: bytes) -> tuple[dict, dict, bool]:
    """Send ``data``; the answer and whether the worker closed the connection after it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        sock.sendall(data)
        reader = wire.FrameReader(sock)
        header, arrays = reader.read()
        try:
            sock.sendall(wire.encode({"op": "health"}))
            reader.read()
            closed = False
        except (wire.PeerClosed, BrokenPipeError, ConnectionResetError):
            closed = True
    return header, arrays, closed


def test_bad_frames_are_rejected(worker: Worker) -> None:
    length = TINY["max_seq_len"]
    ok_seq = np.ones((2, length), np.int64)
    ok_lag = np.zeros((2, length), np.float32)
    broken = {
        "magic": b"HTTP" + wire.PREFIX.pack(wire.MAGIC, 2, 0)[4:] + b"{}",
        "huge header": wire.PREFIX.pack(wire.MAGIC, wire.MAX_HEADER_BYTES + 1, 0),
        "huge payload": wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40) + b"{}",
        "not json": wire.PREFIX.pack(wire.MAGIC, 3, 0) + b"{x}",
        "not an object": wire.PREFIX.pack(wire.MAGIC, 2, 0) + b"[]",
        "bytes mismatch": _frame({"op": "embed", "arrays": [  # 8 bytes needed, 16 sent
            {"name": "item_seq", "dtype": "int64", "shape": [1]}]}, b"\0" * 16),
        "pickle dtype": _frame({"op": "embed", "arrays": [
            {"name": "item_seq", "dtype": "object", "shape": [1]}]}, b"\0" * 8),
    }  # fmt: skip
    for name, data in broken.items():
        header, _, closed = _raw(worker.sock, data)
        assert header == {**header, "ok": False, "error": "bad_frame"}, name
        assert closed, name
    refused = {
        "unknown op": wire.encode({"op": "shutdown"}),
        "no version": wire.encode({"op": "embed"}, [("item_seq", ok_seq), ("time_lag", ok_lag)]),
        "wrong length": _embed(ok_seq[:, 1:], ok_lag[:, 1:]),
        "float64 lags": _embed(ok_seq, ok_lag.astype(np.float32), lag_dtype="float64"),
        "token out of range": _embed(ok_seq * (N_ITEMS + 1), ok_lag),
        "missing time_lag": wire.encode(
            {"op": "embed", "model_version": "tw-a"}, [("item_seq", ok_seq)]
        ),  # fmt: skip
        "empty batch": _embed(ok_seq[:0], ok_lag[:0]),
        "nan lag": _embed(ok_seq, ok_lag + np.float32("nan")),
    }
    for name, data in refused.items():
        header, arrays, closed = _raw(worker.sock, data)
        assert header["ok"] is False and header["error"] in (
            "bad_request", "version_mismatch", "bad_frame"), name  # fmt: skip
        assert not arrays, name
        if header["error"] != "bad_frame":
            assert not closed, name  # a refused request leaves the connection usable
    # Still serving.
    client = TowerWorkerClient(worker.sock, timeout_s=30.0)
    assert client.embed("tw-a", ok_seq, ok_lag).shape == (2, TINY["dim"])
    client.close()


def _frame(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return wire.PREFIX.pack(wire.MAGIC, len(head), len(payload)) + head + payload


def _embed(item_seq: np.ndarray, time_lag: np.ndarray, lag_dtype: str = "float32") -> bytes:
    if lag_dtype == "float64":
        # encode() refuses float64; write the frame by hand as a foreign client would.
        lag = time_lag.astype(np.float64)
        header = {"op": "embed", "model_version": "tw-a", "arrays": [
            {"name": "item_seq", "dtype": "int64", "shape": list(item_seq.shape)},
            {"name": "time_lag", "dtype": "float64", "shape": list(lag.shape)}]}  # fmt: skip
        return _frame(header, item_seq.tobytes() + lag.tobytes())
    return wire.encode({"op": "embed", "model_version": "tw-a"},
                       [("item_seq", item_seq), ("time_lag", time_lag)])  # fmt: skip


def test_wire_round_trip() -> None:
    a, b = socket.socketpair()
    with a, b:
        arrays = [("x", np.arange(6, dtype=np.int64).reshape(2, 3)),
                  ("y", np.ones((0, 4), np.float32)), ("z", np.float32(2.5).reshape(()))]  # fmt: skip
        a.sendall(wire.encode({"op": "t", "n": 1}, arrays))
        reader = wire.FrameReader(b)
        header, got = reader.read()
        assert header["op"] == "t" and header["n"] == 1
        for name, array in arrays:
            assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
        a.close()
        with pytest.raises(wire.PeerClosed):
            reader.read()
    with pytest.raises(ValueError, match="not allowed"):
        wire.encode({}, [("x", np.zeros(2, np.float64))])
    assert struct.calcsize(">4sIQ") == wire.PREFIX.size


def test_concurrent_requests_run_as_one_batch(deployment: Path) -> None:
    """Requests that queue while the GPU (here: the CPU) is busy are computed together, and
    each gets exactly its own rows back."""
    import threading

    from worker.tower import TowerWorker

    worker = TowerWorker(deployment / "artifacts" / "tw-a", "cpu")
    runner = UserTowerRunner(deployment / "artifacts" / "tw-a")
    feeds = [_inputs(runner, batch, seed=40 + batch) for batch in (1, 2, 3)]
    answers: dict[int, tuple[dict, np.ndarray]] = {}

    def call(n: int) -> None:
        item_seq, time_lag = feeds[n]
        arrays = {"item_seq": item_seq, "time_lag": time_lag}
        answers[n] = worker.embed({"model_version": "tw-a"}, arrays)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(3)]
    with worker._compute:  # the device is busy: requests queue behind the first group
        for thread in threads:
            thread.start()
        # The compute thread took what was queued when it woke (1 to 3 requests) and waits
        # for the device; the rest queue.  Either way some group holds >= 2 requests.
        deadline = time.monotonic() + 10
        while len(worker._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(60)
    rows = {n: feeds[n][0].shape[0] for n in range(3)}
    assert any(answers[n][0]["batch_rows"] > rows[n] for n in range(3))
    assert all(answers[n][0]["batch_rows"] >= rows[n] for n in range(3))
    for n, (header, embedding) in answers.items():
        assert header["ok"] and embedding.shape == (feeds[n][0].shape[0], TINY["dim"])
        assert np.abs(embedding - _ort_embedding(runner, *feeds[n])).max() < TOL


# --------------------------------------------------------------------------- spinning


def _embed_both_ways(sock: Path, item_seq: np.ndarray, time_lag: np.ndarray) -> list[np.ndarray]:
    """The embeddings of clients that spin (far longer than a request) and that do not."""
    out = []
    for spin_us in (0, 60_000_000):
        client = TowerWorkerClient(sock, timeout_s=30.0, spin_us=spin_us)
        try:
            out += [client.embed("tw-a", item_seq, time_lag) for _ in range(3)]
        finally:
            client.close()
    return out


def test_spinning_gives_the_same_answers_and_keeps_deadlines(
    deployment: Path, worker: Worker
) -> None:
    """A worker that spins (from the service's env var, as a sidecar reads it) and one that
    does not (the module's, --spin-us 0), each asked by a client that spins and one that
    does not: the same embeddings.  A spinning request to a stopped worker (SIGSTOP) still
    times out; to a worker killed while it spins, the connection loss is seen (not the 60 s
    timeout)."""
    runner = UserTowerRunner(deployment / "artifacts" / "tw-a")
    item_seq, time_lag = _inputs(runner, 4, seed=5)
    # 2 s: longer than the gaps between this test's requests (they land while it spins),
    # short enough not to hold a core of the shared box for long after the last one.
    spinning = Worker(deployment / "artifacts" / "current",
                      env={"T2DIFF_TOWER_WORKER_SPIN_US": "2000000"})  # fmt: skip
    try:
        assert spinning.health["spin_us"] == 2_000_000 and worker.health["spin_us"] == 0
        answers = _embed_both_ways(spinning.sock, item_seq, time_lag)
        answers += _embed_both_ways(worker.sock, item_seq, time_lag)
        for got in answers[1:]:
            assert np.array_equal(got, answers[0])

        client = TowerWorkerClient(spinning.sock, timeout_s=0.5, spin_us=600_000_000)
        assert client.embed("tw-a", item_seq, time_lag).shape == (4, TINY["dim"])
        spinning.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(WorkerError, match="TimeoutError"):
                client.embed("tw-a", item_seq, time_lag)
        finally:
            spinning.proc.send_signal(signal.SIGCONT)
        client.close()
        # Serving again (a generous timeout: the resumed worker first answers the stale
        # request, on a busy box with two processes spinning).
        client = TowerWorkerClient(spinning.sock, timeout_s=30.0, spin_us=600_000_000)
        assert np.array_equal(client.embed("tw-a", item_seq, time_lag), answers[0])

        client.timeout_s = 60.0  # the pooled connection, then (its retry) a fresh one
        spinning.proc.send_signal(signal.SIGSTOP)
        errors: list[BaseException] = []

        def ask() -> None:
            try:
                client.embed("tw-a", item_seq, time_lag)
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                errors.append(exc)

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.2)  # the request is sent; the client spins for the answer
        spinning.kill()  # SIGKILL works on a stopped process
        asking.join()
        assert len(errors) == 1 and isinstance(errors[0], WorkerError)
        assert "TimeoutError" not in str(errors[0])  # the loss was seen, not waited out
        client.close()
    finally:
        spinning.stop()


def test_wait_healthy_stops_at_an_exited_process_and_at_stop(tmp_path: Path) -> None:
    """No worker on the socket: a process that exits ends a long wait (WorkerExited), a
    stop event ends it with None, and deadline 0 means one try (the last error)."""
    missing = Path(tempfile.mkdtemp(prefix="t2tw-", dir="/tmp")) / "none.sock"
    client = TowerWorkerClient(missing, timeout_s=1.0)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"]
    )
    with pytest.raises(WorkerExited) as exited:
        wait_healthy(client, 600.0, proc=proc, interval_s=0.05)
    assert exited.value.returncode == 3
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert wait_healthy(client, 600.0, stop=stop, interval_s=10.0) is None
    with pytest.raises(WorkerError, match="cannot connect"):
        wait_healthy(client, 0.0)


def test_ping(worker: Worker, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.ping import ping

    assert ping(worker.sock) == 0
    assert "versions ['tw-a']" in capsys.readouterr().out
    assert ping(worker.sock.parent / "none.sock") == 1
    assert "cannot connect" in capsys.readouterr().out
