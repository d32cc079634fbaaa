"""Smoke test of ``bench/bench_artifacts.py``: a real tiny export through the service's
loader, and the yardstick in the same interleaved loop when ``../shared`` is beside the
repository.  No timing is asserted (the figures are in ``docs/results/inference.md``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from export_fixtures import export_tiny_t2diff  # noqa: E402
from model_fixtures import perturbed_t2diff  # noqa: E402

from bench import bench_artifacts  # noqa: E402

YARDSTICK = Path(__file__).resolve().parents[2] / "shared" / "bench" / "tower_yardstick.py"
TINY = {"dim": 16, "unet_width": 8, "max_seq_len": 12, "session_len": 4, "diffusion_steps": 3}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == bench_artifacts.HEADER
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def test_exports_and_eager_are_timed_per_batch(tmp_path: Path) -> None:
    export = export_tiny_t2diff(
        tmp_path / "tiny", perturbed_t2diff(TINY, 1), "v1", noise_seed=0, item_name=str,
        torch_tower=True,
    )  # fmt: skip
    out = tmp_path / "rows.csv"
    argv = [str(export), "--batches", "1,2", "--runs", "4", "--warmup", "1", "--csv", str(out),
            "--eager"]  # fmt: skip
    assert bench_artifacts.main(argv) == 0
    rows = _rows(out)
    assert [(r["artifacts"], r["model"], r["batch"]) for r in rows] == [
        ("tiny", "t2diff", "1"), ("tiny-eager", "t2diff-eager", "1"),
        ("tiny", "t2diff", "2"), ("tiny-eager", "t2diff-eager", "2"),
    ]  # fmt: skip
    for row in rows:
        assert row["steps"] == "3"
        assert 0 < float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"])


def test_the_yardstick_runs_in_the_same_run(tmp_path: Path) -> None:
    if not YARDSTICK.is_file():
        pytest.skip(f"the yardstick is not at {YARDSTICK} (../shared absent)")
    export = export_tiny_t2diff(
        tmp_path / "tiny", perturbed_t2diff(TINY, 1), "v1", noise_seed=0, item_name=str
    )
    out = tmp_path / "rows.csv"
    argv = [str(export), "--batches", "1", "--runs", "2", "--warmup", "1", "--csv", str(out),
            "--yardstick", str(YARDSTICK), "--yardstick-widths", "8"]  # fmt: skip
    assert bench_artifacts.main(argv) == 0
    rows = _rows(out)
    assert [(r["artifacts"], r["model"]) for r in rows] == [
        ("tiny", "t2diff"), ("yardstick_ort_w8", "yardstick")
    ]  # fmt: skip
    assert float(rows[1]["p50_ms"]) > 0
