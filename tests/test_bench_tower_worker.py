"""Smoke test of ``bench/bench_tower_worker.py --overhead-only`` on a tiny export (CPU):
the worker and client children start from a code root, every row is written, and the
overhead is the round trip minus the worker's compute.  No time is asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from export_fixtures import export_tiny_t2diff
from model_fixtures import perturbed_t2diff

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dim": 16, "unet_width": 16, "max_seq_len": 13, "session_len": 4, "diffusion_steps": 3}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-worker") / "bw-a"
    return export_tiny_t2diff(
        out, perturbed_t2diff(TINY, 7), "bw-a", noise_seed=3, item_name=str, torch_tower=True
    )


def test_overhead_only_writes_every_row(export: Path, tmp_path: Path) -> None:
    csv_path, out = tmp_path / "overhead.csv", tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "bench_tower_worker.py"), "--overhead-only",
        "--artifacts", str(export), "--device", "cpu", "--overhead-compute", "noop,eager",
        "--code-root", f"this={ROOT}", "--batches", "1,2", "--runs", "5", "--warmup", "1",
        "--machine", "test", "--csv", str(csv_path), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    got = {(r["backend"], r["batch"]) for r in rows}
    for batch in ("1", "2"):
        for name in ("roundtrip_noop_this", "overhead_noop_this", "roundtrip_eager_this",
                     "overhead_eager_this", "compute_eager_this"):  # fmt: skip
            assert (name, batch) in got
    for r in rows:
        assert r["machine"] == "test" and float(r["p50_ms"]) <= float(r["p99_ms"])
    [checks] = json.loads((out / "checks.json").read_text())
    assert checks["loadavg_start"] and checks["loadavg_end"]
    # The round trip contains the worker's compute: the overhead is what is left over.
    for batch in (1, 2):
        rt = checks[f"roundtrip_eager_this_B{batch}_ms"]["p50"]
        compute = checks[f"compute_eager_this_B{batch}_ms"]["p50"]
        assert rt >= compute > 0
