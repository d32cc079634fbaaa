"""Data-parallel training under torchrun: two CPU processes (gloo) train one run together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from model.data import write_synthetic  # noqa: E402
from t2diff_cli.local_stack import free_port  # noqa: E402


def test_torchrun_two_gloo_processes_train_one_run(tmp_path: Path) -> None:
    data = write_synthetic(tmp_path / "data", n_users=120, n_items=60, n_clusters=4)
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "t2diff_cli.main", "train",
        "--data", str(data), "--out", str(run), "--epochs", "2", "--device", "cpu",
        "--batch-size", "64", "--no-progress",
        "--set", "dim=16", "--set", "unet_width=8", "--set", "diffusion_steps=5",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # Rank 0 alone speaks and writes: one summary on stdout, one complete run directory.
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["epochs_run"] == 2 and summary["best_epoch"] >= 0
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    assert all(row["train_loss"] > 0 for row in history)
    assert (run / "model.pt").is_file() and (run / "checkpoint.pt").is_file()
