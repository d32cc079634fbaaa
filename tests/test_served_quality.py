"""``bench/served_quality.py`` end to end on a small synthetic log: a real ``redis-server``
filled by the service's bulk loader, the real service (``python -m service.server``), ONNX
Runtime and FAISS, one ``POST /recall`` per test user.

With an exact index (``Flat``) or an IVF index probed in full (``nprobe = nlist``, and a
refine shortlist of ``k_factor * 100`` >= all 200 items) the served ranking is an exact
search, so served HR@100 must equal the offline exact HR@100 of the ONNX tower with the
same exclusion, exactly: every user's history here is shorter than the 200 behaviours Redis
keeps, so the service sees every seen item.  No time is asserted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from index_builder.build import factory_nlist
from t2diff_cli.local_stack import free_port, redis_binary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import served_quality  # noqa: E402

pytestmark = pytest.mark.skipif(redis_binary() is None, reason="redis-server is not on PATH")

N_USERS = 300


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch SASRec (width 16, window 20) on a 300-user synthetic log."""
    from model.data import write_synthetic
    from model.train import DataSource, TrainConfig, train_run

    root = tmp_path_factory.mktemp("served-quality")
    path = write_synthetic(root / "data", n_users=N_USERS, n_items=200, n_clusters=8)
    run_dir = root / "run"
    train_run(
        DataSource(str(path)),
        run_dir,
        "sasrec",
        {"dim": 16, "max_seq_len": 20},
        TrainConfig(epochs=1, progress=False, device="cpu"),
    )
    return run_dir


def run_tool(run_dir: Path, out: Path, *extra: str) -> tuple[int, dict]:
    report = out / "report.json"
    code = served_quality.main(
        ["--run", str(run_dir), "--workdir", str(out), "--json-out", str(report), *extra]
    )
    return code, json.loads(report.read_text())


def test_served_equals_offline_exact_with_a_flat_index(trained_run: Path, tmp_path: Path) -> None:
    code, report = run_tool(trained_run, tmp_path, "--factory", "Flat", "--concurrency", "8")
    assert code == 0
    stages, served = report["stages"], report["served"]
    assert report["users"] == N_USERS
    assert served["statuses"] == {"200": N_USERS}
    assert served["bad"] == 0 and served["degraded"] == {} and served["cold_start"] == 0
    assert served["sessions_loaded"] == N_USERS
    # Exact search all the way: identical lists, identical figures.
    assert served["same_list_as_offline_index"] == N_USERS
    assert served["mean_overlap_with_exact_topk"] == 1.0
    exact = stages["onnx_exact_session"]
    for metric in ("hr@10", "hr@100", "ndcg@10"):
        assert stages["served"][metric] == pytest.approx(exact[metric], abs=1e-12)
        assert stages["onnx_index"][metric] == pytest.approx(exact[metric], abs=1e-12)
    # Histories fit in Redis: the session view excludes what the evaluator excludes.
    assert stages["onnx_exact_session"] == stages["onnx_exact"]
    # The export against the PyTorch evaluator: float32 graph differences may move a
    # target across a cut-off only on a near tie; allow one user.
    for metric in ("hr@10", "hr@100"):
        assert abs(stages["onnx_exact"][metric] - stages["pytorch_exact"][metric]) <= 1 / N_USERS
    assert report["date"] and report["command"] and report["machine"]["cpu_count"]


def test_served_equals_offline_exact_with_ivf_probed_in_full(
    trained_run: Path, tmp_path: Path
) -> None:
    from index_builder.build import default_factory

    factory = default_factory(200, 16)
    nlist = factory_nlist(factory)
    assert nlist is not None and "Refine(Flat)" in factory
    code, report = run_tool(trained_run, tmp_path, "--nprobe", str(nlist), "--users", "120")
    assert code == 0
    assert report["index"]["factory"] == factory and report["index"]["nprobe"] == nlist
    stages, served = report["stages"], report["served"]
    assert served["bad"] == 0 and served["statuses"] == {"200": 120}
    assert served["same_list_as_offline_index"] == 120
    for metric in ("hr@10", "hr@100", "ndcg@10"):
        assert stages["served"][metric] == pytest.approx(
            stages["onnx_exact_session"][metric], abs=1e-12
        )


def test_degraded_answers_are_counted_as_misses(trained_run: Path, tmp_path: Path) -> None:
    """The service pointed at a Redis where nothing listens answers every recall with the
    popular fallback, ``degraded``: the tool reports them, scores them as misses and
    exits 1."""
    dead = f"T2DIFF_REDIS_URL=redis://127.0.0.1:{free_port()}/0"
    code, report = run_tool(
        trained_run, tmp_path, "--factory", "Flat", "--users", "40", "--service-env", dead
    )
    assert code == 1
    served = report["served"]
    assert served["bad"] == 40 and sum(served["degraded"].values()) == 40
    assert set(served["degraded"]) <= {"redis_error", "redis_timeout", "redis_circuit_open"}
    assert stages_zero(report["stages"]["served"])


def stages_zero(row: dict[str, float]) -> bool:
    return row["hr@10"] == 0.0 and row["hr@100"] == 0.0 and row["ndcg@10"] == 0.0


def test_list_ranks_and_figures() -> None:
    ranks = served_quality.list_ranks([["a", "b"], ["c"], []], ["b", "x", "y"])
    assert ranks.tolist() == [1, served_quality.MISS, served_quality.MISS]
    row = served_quality.figures(ranks)
    assert row["hr@10"] == pytest.approx(1 / 3) and row["n_users"] == 3
