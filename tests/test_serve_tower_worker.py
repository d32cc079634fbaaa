"""``t2diff serve --tower-worker``: the tower worker started as the serve's child, with real
parts (a tiny T2Diff exported as ``t2diff export`` does, FAISS, ONNX Runtime, redis-server,
the worker as a real process; on this CPU box it runs the eager reference).

* End to end: ``t2diff serve --tower-worker on`` as a subprocess answers ``/recall`` through
  its worker with ONNX Runtime's items and scores (1e-4); the worker killed while serving
  gives degraded answers (``tower_error``, never a 5xx) and is restarted; a hot swap loads
  the promoted version into the serve-started worker; SIGTERM stops the worker and removes
  its socket.
* A worker that cannot come up leaves ONNX Runtime serving (logged), not a crash.
* ``auto`` starts none without a GPU, or when the settings already choose.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from export_fixtures import deploy_versions, export_tiny_t2diff, point_current
from fastapi.testclient import TestClient
from model_fixtures import perturbed_t2diff

from service.app import create_app
from service.remote_tower import TowerWorkerClient
from service.settings import Settings
from t2diff_cli.local_stack import (
    file_tail,
    free_port,
    service_settings,
    stop_process,
    wait_until_ready,
)
from worker import supervisor

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dim": 16, "unet_width": 16, "max_seq_len": 13, "session_len": 4, "diffusion_steps": 3}
TOL = 1e-4
N_ITEMS = 40  # perturbed_t2diff's item count
TOKEN = "serve-worker-token"
# Waits for processes on a busy 2-core box (torch import, loads); not time assertions.
START_TIMEOUT_S = 120.0


def item_name(row: int) -> str:
    return f"film-{row}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions sv-a and sv-b (different weights, with the worker's checkpoint) and sv-plain
    (ONNX only: a worker cannot load it), each with its index; ``current`` -> sv-a."""
    seeds = {"sv-a": 31, "sv-b": 32, "sv-plain": 33}
    root = deploy_versions(
        tmp_path_factory.mktemp("serve-worker"),
        lambda out, v: export_tiny_t2diff(
            out, perturbed_t2diff(TINY, seeds[v]), v, noise_seed=5, item_name=item_name,
            torch_tower=v != "sv-plain",
        ),
        tuple(seeds),
    )  # fmt: skip
    point_current(root, "sv-a")
    return root


def _events(user: str, rows: list[int]) -> dict:
    return {
        "events": [
            {"user_id": user, "item_id": item_name(r), "timestamp": 1_700_000_000.0 + 600.0 * i}
            for i, r in enumerate(rows)
        ]
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready_workers(log_path: Path) -> list[tuple[int, str]]:
    """(pid, socket) of each 'tower worker pid N ready on S' line of the serve's log."""
    text = log_path.read_text(errors="replace")
    return [(int(m[1]), m[2]) for m in re.finditer(r"tower worker pid (\d+) ready on (\S+):", text)]


def test_serve_starts_the_worker_and_stops_it(
    deployment: Path, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        **service_settings(
            deployment / "artifacts" / "current", deployment / "indexes" / "current", redis_url,
            port,
        ),
        "T2DIFF_LOG_JSON": "false",
        "T2DIFF_WATCH_INTERVAL_S": "0",
        "T2DIFF_ADMIN_TOKEN": TOKEN,
        "T2DIFF_BUDGET_MS": "30000",
        "T2DIFF_MAX_BUDGET_MS": "30000",
        # The CPU reference path on a busy 2-core box; a hang still fails the request.
        "T2DIFF_TOWER_WORKER_TIMEOUT_MS": "30000",
        "T2DIFF_REDIS_TIMEOUT_MS": "2000",
        "T2DIFF_REDIS_POOL_TIMEOUT_MS": "2000",
        "T2DIFF_INFERENCE_CONCURRENCY": "2",
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    onnx_settings = Settings(
        artifacts_dir=deployment / "artifacts" / "current",
        index_dir=deployment / "indexes" / "current",
        redis_url=redis_url,
        budget_ms=30_000,
        max_budget_ms=30_000,
        watch_interval_s=0,
        tower_backend="onnx",
        inference_concurrency=2,
    )
    log_path = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    # Nothing may fail between the start and the `try` (a serve left running would keep
    # its worker): the serve is the last thing made before it.
    with log_path.open("wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "t2diff_cli.main", "serve", "--tower-worker", "on"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_ready(base, START_TIMEOUT_S, serve)  # type: ignore[arg-type]
        text = log_path.read_text(errors="replace")
        assert "served by the tower worker" in text, file_tail(log_path)
        [(pid, sock)] = _ready_workers(log_path)
        sock_dir = Path(sock).parent
        assert stat_mode(sock_dir) == 0o700  # private to the service's user
        health = TowerWorkerClient(sock, timeout_s=30).health()
        assert health["path"] == "eager" and health["versions"] == ["sv-a"]

        # /recall through the worker = ONNX Runtime's answer on the same history.
        http = httpx.Client(base_url=base, timeout=60)
        rng = np.random.default_rng(4)
        with TestClient(create_app(onnx_settings)) as onnx:
            for n in range(3):
                user = f"sv-user-{n}"
                assert http.post("/events", json=_events(user, rng.integers(0, N_ITEMS, 7).tolist())).status_code == 200  # fmt: skip
                a = http.post("/recall", json={"user_id": user, "k": 15}).json()
                b = onnx.post("/recall", json={"user_id": user, "k": 15}).json()
                assert not a["degraded"] and a["model_version"] == "sv-a", a
                assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
                scores_a = np.array([i["score"] for i in a["items"]])
                scores_b = np.array([i["score"] for i in b["items"]])
                assert np.abs(scores_a - scores_b).max() < TOL

        # The worker dies while serving: degraded answers (never a 5xx), then a restart.
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _pid_alive(pid) or _zombie(pid), 30, "the killed worker")
        body = http.post("/recall", json={"user_id": "sv-user-0", "k": 15})
        assert body.status_code == 200
        assert body.json()["degraded"] and body.json()["degraded_reason"] == "tower_error"
        _wait_for(lambda: len(_ready_workers(log_path)) == 2, START_TIMEOUT_S, "the restart")
        pid, sock = _ready_workers(log_path)[-1]

        def recovered() -> bool:
            return not http.post("/recall", json={"user_id": "sv-user-0", "k": 15}).json()[
                "degraded"
            ]

        _wait_for(recovered, 30, "a non-degraded recall after the restart")

        # Hot swap: the serve-started worker loads the promoted version from beside the
        # first (its --allow-root), and the service answers with it.
        point_current(deployment, "sv-b")
        reload = http.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert reload.json()["status"] == "reloaded", reload.text
        on_b = http.post("/recall", json={"user_id": "sv-user-1", "k": 15}).json()
        assert on_b["model_version"] == "sv-b" and not on_b["degraded"], on_b
        assert "sv-b" in TowerWorkerClient(sock, timeout_s=30).health()["versions"]
        http.close()

        # SIGTERM: the serve exits, its worker is gone and the socket removed.
        serve.send_signal(signal.SIGTERM)
        # Ended by the signal after its cleanup, as a serve without a worker ends.
        assert serve.wait(60) == -signal.SIGTERM, file_tail(log_path)
        assert "tower worker stopped" in log_path.read_text(errors="replace")
        _wait_for(lambda: not _pid_alive(pid), 15, "the worker to exit")
        assert not Path(sock).exists() and not sock_dir.exists()
    finally:
        point_current(deployment, "sv-a")
        # SIGTERM first, so that the serve stops its worker and removes the socket.
        stop_process(serve, 30)  # type: ignore[arg-type]


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _zombie(pid: int) -> bool:
    """A killed child not yet reaped by its parent (the serve's supervisor reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def test_a_worker_that_cannot_start_leaves_onnx_serving(deployment: Path, caplog) -> None:
    """sv-plain has no torch checkpoint: the worker exits, the serve keeps its settings
    (ONNX Runtime) and says why; its socket directory is removed."""
    settings = Settings(artifacts_dir=deployment / "artifacts" / "sv-plain")
    with caplog.at_level(logging.INFO, logger="t2diff.serve"):
        with supervisor.tower_worker("on", settings) as serving:
            assert serving is settings and serving.tower_worker_socket is None
    assert "did not come up" in caplog.text and "serving with ONNX Runtime" in caplog.text
    [sock] = re.findall(r"tower worker started: pid \d+, socket (\S+)", caplog.text)
    assert not Path(sock).parent.exists()


def test_auto_starts_a_worker_only_with_torch_and_a_gpu(monkeypatch, tmp_path: Path) -> None:
    real_cuda_gpu = supervisor.cuda_gpu
    settings = Settings(artifacts_dir=tmp_path)
    monkeypatch.setattr(supervisor, "torch_installed", lambda: True)
    monkeypatch.setattr(supervisor, "cuda_gpu", lambda: (False, "no nvidia-smi"))
    assert supervisor.decide("auto", settings)[0] is None
    monkeypatch.setattr(supervisor, "cuda_gpu", lambda: (True, "GPU 0: H100"))
    # On a GPU the worker must use it (a CPU fallback would be slower than ONNX Runtime).
    assert supervisor.decide("auto", settings)[0] == "cuda"
    # The settings already choose: ONNX Runtime, or a sidecar worker's socket.
    onnx = Settings(artifacts_dir=tmp_path, tower_backend="onnx")
    assert supervisor.decide("auto", onnx)[0] is None
    assert supervisor.decide("on", onnx)[0] is None
    sidecar = Settings(artifacts_dir=tmp_path, tower_worker_socket=tmp_path / "s.sock")
    assert supervisor.decide("auto", sidecar)[0] is None
    monkeypatch.setattr(supervisor, "torch_installed", lambda: False)
    assert supervisor.decide("auto", settings)[0] is None
    assert supervisor.decide("on", settings)[0] == "auto"  # on: eager on a CPU
    assert supervisor.decide("off", settings)[0] is None
    with pytest.raises(ValueError, match="must be one of"):
        supervisor.decide("yes", settings)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert real_cuda_gpu()[0] is False


def test_the_serve_process_does_not_import_torch() -> None:
    """The CLI's serve path (and the child manager) stays torch-free at import time."""
    code = (
        "import sys, t2diff_cli.main, worker.supervisor, service.server;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_spin_setting_reaches_the_worker_child(monkeypatch, tmp_path: Path) -> None:
    """TOWER_WORKER_SPIN_US unset: the worker child resolves its default on this machine as
    the service's client does (3000 µs with >= 4 usable cores, else 0); set: passed as
    ``--spin-us`` (and 0 turns spinning off on both sides)."""
    from contracts import tower_wire as wire
    from service.remote_tower import TowerBackend

    monkeypatch.delenv("T2DIFF_TOWER_WORKER_SPIN_US", raising=False)
    default = Settings(artifacts_dir=tmp_path)
    assert default.tower_worker_spin_us is None
    # Cores: the affinity, capped by a cgroup CPU quota; >= 4 of them turn spinning on.
    assert wire.usable_cpus() > 0
    on = wire.usable_cpus() >= wire.SPIN_MIN_CPUS
    assert wire.default_spin_us() == (wire.DEFAULT_SPIN_US if on else 0)
    assert TowerBackend.from_settings(default).spin_us is None
    monkeypatch.setenv("T2DIFF_TOWER_WORKER_SPIN_US", "0")
    off = Settings(artifacts_dir=tmp_path)
    assert off.tower_worker_spin_us == 0 and TowerBackend.from_settings(off).spin_us == 0
    for spin_us, want in ((None, None), (0, "0"), (1500, "1500")):
        child = supervisor.TowerWorkerChild(tmp_path, "cpu", 1.0, spin_us)
        try:
            command = child.command()
            got = command[command.index("--spin-us") + 1] if "--spin-us" in command else None
            assert got == want
        finally:
            child.stop()  # no process: removes the socket directory
