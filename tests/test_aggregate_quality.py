"""bench/aggregate_quality.py: runs' summaries -> the model-quality CSV (drop, rename, bad input)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "aggregate_quality.py"
METRICS = ["recall@2", "recall@20", "mrr@2", "mrr@20", "hr@10", "hr@20", "hr@50"]
METRICS += ["ndcg@10", "ndcg@20", "ndcg@50"]


def _summary(path: Path, rows: list[tuple[str, float]]) -> Path:
    """A parallel_train summary: one row per (job name, value of every metric)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["name", "model", "seed", "best_epoch", "epochs_run", "valid_ndcg@10", *METRICS]
        )
        for name, value in rows:
            writer.writerow([name, name.rsplit("_s", 1)[0], 0, 1, 2, 0.1, *[value] * len(METRICS)])
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def _means(path: Path) -> dict[tuple[str, str], tuple[float, int]]:
    with open(path) as handle:
        return {
            (r["model"], r["metric"]): (float(r["mean"]), int(r["n_seeds"]))
            for r in csv.DictReader(handle)
        }


def test_drop_and_rename(tmp_path: Path) -> None:
    one = _summary(tmp_path / "ml_run1_summary.csv", [("dimerec_s0", 0.1), ("comirec_sa_s0", 0.3)])
    two = _summary(
        tmp_path / "ml_run2_summary.csv",
        [("dvar_s0", 0.5), ("dvar_s1", 0.7), ("comirec_sa_s1", 0.4)],
    )
    out = tmp_path / "quality.csv"
    result = _run(
        str(one), str(two), "--drop", "run2:comirec_sa",
        "--rename", "run1:dimerec=dimerec_std,run2:dvar=dimerec", "--csv", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    means = _means(out)
    assert means[("dimerec", "hr@50")] == (0.6, 2)  # run 2's dvar rows, renamed
    assert means[("dimerec_std", "hr@50")] == (0.1, 1)  # run 1's dimerec rows
    assert means[("comirec_sa", "hr@50")] == (0.3, 1)  # run 2's row dropped
    assert "| dimerec | 2 |" in result.stdout


def test_a_malformed_rename_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    one = _summary(tmp_path / "ml_run1_summary.csv", [("dimerec_s0", 0.1)])
    out = tmp_path / "quality.csv"
    out.write_text("kept\n")
    for bad in ("run1dimerec=x", "run1:dimerec=", "dimerec=x", "run1:a:b=x"):
        result = _run(str(one), "--rename", bad, "--csv", str(out))
        assert result.returncode == 2 and "expected run<N>:variant=label" in result.stderr, bad
    assert out.read_text() == "kept\n"
