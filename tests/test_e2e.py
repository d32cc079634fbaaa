"""The walking skeleton end to end through the CLI, with the real T2Diff model:
synthetic data -> train -> evaluate -> export (ONNX) -> FAISS index -> Redis -> /recall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.settings import Settings
from t2diff_cli.main import app

runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data, run = root / "data", root / "runs" / "tiny"
    artifacts, index = root / "artifacts" / "v1", root / "indexes" / "v1"
    cli("data", "synth", "--out", str(data), "--users", "200", "--items", "120", "--clusters", "6")
    cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--lr",
        "0.003",
        "--no-progress",
        "--set",
        "dim=16",
        "--set",
        "unet_width=8",
        "--set",
        "diffusion_steps=50",
    )
    cli("evaluate", "--run", str(run), "--device", "cpu")
    cli("export", "--run", str(run), "--out", str(artifacts))
    cli("build-index", "--artifacts", str(artifacts), "--out", str(index))
    return {"data": data, "run": run, "artifacts": artifacts, "index": index}


def test_trained_model_beats_popularity(pipeline: dict[str, Path]) -> None:
    metrics = json.loads((pipeline["run"] / "metrics.json").read_text())
    ours, popular = metrics["t2diff"]["test"], metrics["popularity"]["test"]
    assert ours["recall@20"] > popular["recall@20"]
    assert ours["ndcg@10"] > popular["ndcg@10"]


def test_manifests_record_versions_and_recall(pipeline: dict[str, Path]) -> None:
    model = json.loads((pipeline["artifacts"] / "manifest.json").read_text())
    assert model["model_version"] == "v1" and model["diffusion_steps"] == 50
    assert model["noise_shape"] == [50, 50, 16] and model["opset"] == 17
    assert set(model["files"]) >= {"user_tower.onnx", "item_embeddings.npy", "item_ids.json"}
    assert "recall@20" in model["training_metrics"]["test"]
    index = json.loads((pipeline["index"] / "manifest.json").read_text())
    assert index["model_version"] == "v1" and index["recall_at_10"] >= 0.95


def test_export_refuses_to_overwrite(pipeline: dict[str, Path]) -> None:
    result = runner.invoke(
        app, ["export", "--run", str(pipeline["run"]), "--out", str(pipeline["artifacts"])]
    )
    assert result.exit_code == 2 and "exists" in result.output


def test_recall_through_redis(pipeline: dict[str, Path], redis_url: str) -> None:
    cli("sessions", "load", "--data", str(pipeline["data"]), "--redis-url", redis_url)
    settings = Settings(
        artifacts_dir=pipeline["artifacts"],
        index_dir=pipeline["index"],
        redis_url=redis_url,
        redis_timeout_ms=1000,
        redis_pool_timeout_ms=1000,
    )
    with TestClient(create_app(settings)) as client:
        # /readyz says "warming" while the xhat cache of the loaded users is computed
        # (each call waits up to 0.5 s for it): a bounded loop, no time assertion.
        for _ in range(600):
            ready = client.get("/readyz")
            if ready.status_code == 200:
                break
            assert set(ready.json()["reasons"]) == {"xhat_warm"}, ready.json()
        assert ready.status_code == 200
        response = client.post("/recall", json={"user_id": "u3", "k": 10})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == "v1" and body["index_version"] == "v1"
        assert len(body["items"]) == 10 and not body["cold_start"]
        scores = [item["score"] for item in body["items"]]
        assert scores == sorted(scores, reverse=True)
        # Same request, same answer: the reverse-process noise is fixed by the manifest.
        again = client.post("/recall", json={"user_id": "u3", "k": 10}).json()
        assert again["items"] == body["items"]
        bad = client.post("/recall", json={"user_id": "u3", "k": "many"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "k"
