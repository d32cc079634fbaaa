"""Smoke test of ``bench/bench_tower.py`` on a tiny tower: CSV layout and the parity check.

No timing is asserted (the numbers depend on the machine); the real run is documented in
``docs/results/inference.md``.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_tower.py"
TINY = "tiny:dim=16,unet_width=8,max_seq_len=12,session_len=4,diffusion_steps=3"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tower", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_tower"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_csv_and_passes_parity(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "inference.csv"
    argv = [
        "--config", TINY, "--batches", "1,2", "--runs", "3", "--min-runs", "3",
        "--warmup", "1", "--n-items", "40", "--machine", "test", "--csv", str(out),
        "--experiments", "--exp-batches", "1",
        "--busy-retries", "0", "--extra-steps", "2", "--no-yardstick", "--no-reuse-probe",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "max|diff| vs eager" in printed
    assert "gather_upsample: nodes" in printed  # the export rewrites kept the answer
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == bench.CSV_HEADER
    assert rows[0] == "machine,backend,steps,batch,p50_ms,p95_ms,p99_ms,samples_per_s".split(",")
    body = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    backends = {(r["backend"], r["steps"], r["batch"]) for r in body}
    for name in ("torch_eager_tiny", "ort_cpu_tiny", "ort_cpu_tuned_tiny", "ort_cpu_tuned_1t_tiny"):
        assert {(name, "3", "1"), (name, "3", "2")} <= backends
    assert any(r["steps"] == "2" and r["batch"] == "1" for r in body)  # the extra-T row
    for r in body:
        assert r["machine"] == "test"
        p50, p95, p99 = float(r["p50_ms"]), float(r["p95_ms"]), float(r["p99_ms"])
        assert 0 < p50 <= p95 <= p99 and float(r["samples_per_s"]) > 0
    # A second writer appends under the same header (and refuses a foreign one).
    sink = bench.CsvSink(out, "again", overwrite=False)
    sink.write([bench.Cell("x", 3, 1, [1.0, 2.0, 3.0])])
    with out.open(newline="") as handle:
        again = list(csv.reader(handle))
    assert again[0] == rows[0] and again.count(rows[0]) == 1 and len(again) == len(rows) + 1
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n")
    with pytest.raises(SystemExit):
        bench.CsvSink(foreign, "x", overwrite=False)


def test_parity_check_fails_loudly(bench) -> None:
    reference = np.zeros((2, 4))
    assert bench.check_parity("same", reference, reference.astype(np.float32), 1e-4) == 0.0
    with pytest.raises(bench.ParityError, match="max"):
        bench.check_parity("off", reference, np.full((2, 4), 1e-3, np.float32), 1e-4)
    with pytest.raises(bench.ParityError):
        bench.check_parity("nan", reference, np.full((2, 4), np.nan, np.float32), 1e-4)
    with pytest.raises(bench.ParityError, match="shape"):
        bench.check_parity("shape", reference, np.zeros((2, 3), np.float32), 1e-4)


def test_config_parsing(bench) -> None:
    name, config = bench.parse_config("w32:dim=64,unet_width=32,diffusion_steps=10")
    assert (name, config.dim, config.unet_width, config.diffusion_steps) == ("w32", 64, 32, 10)
    assert config.unet_levels == 3 and config.max_seq_len == 50
