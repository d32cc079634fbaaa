"""DimeRec, ComiRec-SA and the DimeRec ablations on the harness contract.

Tiny sizes throughout (d = 16, L = 12, 30 items, T = 5), so the file runs in seconds on CPU;
the CLI test trains one epoch on a small synthetic log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import (
    BATCH,
    N_ITEMS,
    SEQ_LEN,
    assert_onnx_matches,
    eval_loss,
    noise_for,
    tiny_batch,
    train_steps,
)

from model.dimerec import DimeRec, geodesic_random_walk, l2_normalize
from model.registry import DIMEREC_VARIANTS, build_model, make_config

STEPS = 5
NAMES = list(DIMEREC_VARIANTS)
TINY = {"dim": 16, "max_seq_len": SEQ_LEN, "diffusion_steps": STEPS, "dam_hidden": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str = "dimerec", seed: int = 0, **extra: object) -> DimeRec:
    torch.manual_seed(seed)
    model = build_model(name, N_ITEMS, make_config(name, {**TINY, **extra}))
    assert isinstance(model, DimeRec)
    return model


# --------------------------------------------------------------------------- config


def test_defaults_follow_the_paper() -> None:
    config = make_config("dimerec")
    assert config["interests"] == 4 and config["diffusion_steps"] == 20
    assert config["recon_weight"] == 0.1 and 1.0 <= config["ssm_weight"] <= 10.0
    assert config["gem_weight"] == 1.0 and config["geodesic"] and config["use_diffusion"]
    assert config["sigma_mode"] == "variance"  # Algorithm 2: beta_tilde_t * eps'
    assert make_config("comirec_sa")["use_diffusion"] is False
    assert make_config("dimerec_no_gem")["gem_weight"] == 0.0
    assert make_config("dimerec_no_recon")["recon_weight"] == 0.0
    assert make_config("dimerec_no_ssm")["ssm_weight"] == 0.0
    assert make_config("dimerec_no_grw")["geodesic"] is False
    assert build("dimerec", diffusion_steps=7).noise_shape == (7, 16)
    assert build("comirec_sa").noise_shape == (1,)  # deterministic


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_loss_parts(name: str) -> None:
    model = build(name).eval()
    batch = tiny_batch()
    with torch.no_grad():
        interests = model.interests(batch.item_seq, model.item_embeddings())
        user = model.user_embedding(batch, noise_for(model))
        scores = model.full_sort_scores(batch, noise_for(model))
    assert interests.shape == (BATCH, 4, 16)
    assert user.shape == (BATCH, 16) and scores.shape == (BATCH, N_ITEMS + 1)
    assert torch.isfinite(user).all() and torch.isfinite(scores).all()
    loss, parts = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    expected = {"gem"} if name == "comirec_sa" else {"gem", "recon", "ssm"}
    assert set(parts) == expected


def test_item_embeddings_on_the_sphere() -> None:
    items = build("dimerec").item_embeddings()
    assert torch.count_nonzero(items[0]) == 0  # padding
    assert torch.allclose(items[1:].norm(dim=1), torch.ones(N_ITEMS), atol=1e-6)
    raw = build("dimerec_no_grw")
    assert torch.equal(raw.item_embeddings(), raw.item_emb.weight)  # Euclidean ablation


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases(name: str) -> None:
    model = build(name)
    batch = tiny_batch()
    before, parts_before = eval_loss(model, batch)
    torch.manual_seed(7)
    train_steps(model, batch, 30)
    after, parts_after = eval_loss(model, batch)
    assert after < 0.8 * before, (before, after)
    assert parts_after["gem"] < parts_before["gem"] or name == "dimerec_no_gem"
    assert torch.count_nonzero(model.item_emb.weight[0]) == 0


def test_loss_weights_switch_the_terms() -> None:
    """Each ablation's total is the full weighted sum without its term."""
    batch = tiny_batch()
    for name, mu in (("dimerec", 1.0), ("dimerec_no_gem", 1.0), ("dimerec_no_ssm", 0.0)):
        total, parts = eval_loss(build(name), batch)
        gem = 0.0 if name == "dimerec_no_gem" else parts["gem"]
        expected = gem + 0.1 * parts["recon"] + mu * parts["ssm"]
        assert total == pytest.approx(expected, rel=1e-5)
    total, parts = eval_loss(build("dimerec_no_recon"), batch)
    assert total == pytest.approx(parts["gem"] + parts["ssm"], rel=1e-5)


def test_sampled_softmax_option() -> None:
    model = build("dimerec", negatives=10)
    batch = tiny_batch()
    before, _ = eval_loss(model, batch)
    torch.manual_seed(7)
    train_steps(model, batch, 30)
    assert eval_loss(model, batch)[0] < 0.8 * before


def test_ssm_from_high_steps_option() -> None:
    """``ssm_min_step_frac``: L_ssm on a second denoising from a high t; it still trains,
    leaves L_gem and L_recon as they were, and bad fractions are refused."""
    batch = tiny_batch()
    plain, high = build("dimerec"), build("dimerec", ssm_min_step_frac=0.99)
    _, parts_plain = eval_loss(plain, batch)
    _, parts_high = eval_loss(high, batch)
    assert parts_high["gem"] == pytest.approx(parts_plain["gem"])
    assert parts_high["recon"] == pytest.approx(parts_plain["recon"])
    assert parts_high["ssm"] != pytest.approx(parts_plain["ssm"])
    before, _ = eval_loss(high, batch)
    torch.manual_seed(7)
    train_steps(high, batch, 30)
    assert eval_loss(high, batch)[0] < 0.8 * before
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ssm_min_step_frac"):
            build("dimerec", ssm_min_step_frac=bad)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_with_a_seed(name: str) -> None:
    first, second = build(name, seed=3), build(name, seed=3)
    batch = tiny_batch()
    assert eval_loss(first, batch) == eval_loss(second, batch)
    torch.manual_seed(5)
    train_steps(first, batch, 3)
    torch.manual_seed(5)
    train_steps(second, batch, 3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- diffusion


def test_geodesic_random_walk_stays_on_the_sphere() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = l2_normalize(torch.randn(64, 16, generator=gen))
    eps = torch.randn(64, 16, generator=gen)
    for scale in (0.0, 1e-3, 0.1, 1.0, 3.0, 10.0):
        xt = geodesic_random_walk(x0, eps, torch.full((64, 1), scale))
        assert torch.allclose(xt.norm(dim=1), torch.ones(64), atol=1e-5)
    # No noise: the walk stays put; a small step moves along the geodesic by its length.
    assert torch.allclose(geodesic_random_walk(x0, eps, torch.zeros(64, 1)), x0, atol=1e-6)
    tangent = eps - (eps * x0).sum(1, keepdim=True) * x0
    small = 1e-2
    xt = geodesic_random_walk(x0, eps, torch.full((64, 1), small))
    angle = torch.arccos((xt * x0).sum(1).clamp(-1, 1))
    assert torch.allclose(angle, small * tangent.norm(dim=1), rtol=1e-3, atol=1e-4)
    # The model's forward process, at every step of the schedule.
    model = build("dimerec")
    t = torch.arange(STEPS).repeat_interleave(13)[:64]
    xt = model._add_noise(x0, eps, t)
    assert torch.allclose(xt.norm(dim=1), torch.ones(64), atol=1e-5)


def test_reverse_process_is_unit_norm_and_reproducible() -> None:
    model = build("dimerec").eval()
    batch = tiny_batch()
    with torch.no_grad():
        a = model.user_embedding(batch, noise_for(model, 0))
        again = model.user_embedding(batch, noise_for(model, 0))
        other = model.user_embedding(batch, noise_for(model, 1))
    assert torch.allclose(a.norm(dim=1), torch.ones(BATCH), atol=1e-5)
    assert torch.equal(a, again)
    assert not torch.allclose(a, other)
    # Another noise scale: still on the sphere and reproducible, a different process.
    scaled = build("dimerec", noise_scale=0.0).eval()  # auto: 1 / sqrt(d)
    assert scaled.eps_scale == pytest.approx(0.25)
    with torch.no_grad():
        b = scaled.user_embedding(batch, noise_for(scaled, 0))
    assert torch.allclose(b.norm(dim=1), torch.ones(BATCH), atol=1e-5)
    assert torch.equal(b, scaled.user_embedding(batch, noise_for(scaled, 0)))
    # Euclidean ablation: the same reproducibility, no sphere.
    raw = build("dimerec_no_grw").eval()
    with torch.no_grad():
        first = raw.user_embedding(batch, noise_for(raw, 0))
        second = raw.user_embedding(batch, noise_for(raw, 0))
    assert torch.equal(first, second) and torch.isfinite(first).all()


def test_comirec_scores_are_the_best_interest() -> None:
    model = build("comirec_sa").eval()
    train_steps(model, tiny_batch(), 5)
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        interests = l2_normalize(model.interests(batch.item_seq, model.item_embeddings()))
        per_interest = interests @ model.item_embeddings().T  # [B, K, N + 1]
        scores = model.full_sort_scores(batch)
        served = model.user_embedding(batch, noise_for(model))
    assert torch.allclose(scores, per_interest.amax(dim=1))
    # The served vector is the normalised mean of the K unit interests; it ignores the noise.
    assert torch.allclose(served, l2_normalize(interests.mean(dim=1)), atol=1e-6)
    assert torch.allclose(served[batch.item_seq[:, SEQ_LEN - 1] > 0].norm(dim=1), torch.ones(7))
    with torch.no_grad():
        assert torch.equal(served, model.user_embedding(batch, noise_for(model, 9)))


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name", ["dimerec", "comirec_sa", "dimerec_no_grw"])
def test_onnx_parity(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = build(name)
    train_steps(model, tiny_batch(), 3)
    assert_onnx_matches(model, tmp_path / "tower.onnx", seeds=(0, 1))


# --------------------------------------------------------------------------- CLI


def test_cli_train_evaluate_export_and_serve(tmp_path: Path, redis_url: str) -> None:
    from typer.testing import CliRunner

    from t2diff_cli.main import app

    runner = CliRunner()

    def cli(*args: str) -> None:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output

    data, run, artifacts = tmp_path / "data", tmp_path / "run", tmp_path / "artifacts" / "v1"
    cli("data", "synth", "--out", str(data), "--users", "120", "--items", "60", "--clusters", "4")
    cli(
        "train", "--data", str(data), "--out", str(run), "--model", "dimerec",
        "--epochs", "1", "--device", "cpu", "--no-progress",
        "--set", "dim=16", "--set", "dam_hidden=32", "--set", "diffusion_steps=5",
    )  # fmt: skip
    meta = json.loads((run / "run.json").read_text())
    assert meta["model_name"] == "dimerec" and meta["model_config"]["diffusion_steps"] == 5
    history = json.loads((run / "history.json").read_text())
    assert {"train_gem", "train_recon", "train_ssm"} <= set(history[0])
    cli("evaluate", "--run", str(run), "--device", "cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["dimerec"]["test"]["recall@20"] <= 1.0
    cli("export", "--run", str(run), "--out", str(artifacts))
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["model_name"] == "dimerec" and manifest["noise_shape"] == [5, 16]
    assert manifest["diffusion_steps"] == 5
    embeddings = np.load(artifacts / "item_embeddings.npy")
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # Served by the same service, no code change: the manifest says which model it is.
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    index = tmp_path / "indexes" / "v1"
    cli("build-index", "--artifacts", str(artifacts), "--out", str(index))
    cli("sessions", "load", "--data", str(data), "--redis-url", redis_url)
    # Generous timeouts: a loaded 2-core CI box must not turn this into a degraded answer.
    settings = Settings(
        artifacts_dir=artifacts, index_dir=index, redis_url=redis_url,
        redis_timeout_ms=1000, redis_pool_timeout_ms=1000, budget_ms=5000,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        body = client.post("/recall", json={"user_id": "u3", "k": 5}).json()
        assert len(body["items"]) == 5 and not body["cold_start"] and not body["degraded"]
        assert (
            client.post("/recall", json={"user_id": "u3", "k": 5}).json()["items"]
            == (body["items"])
        )


def test_sampler_noise_bench_rescores_a_run_and_refuses_models_without_diffusion(
    tmp_path: Path,
) -> None:
    """bench/sampler_noise.py: one row per sigma mode plus the GEM row for a DimeRec run;
    a run without a reverse process is refused with its model name."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from t2diff_cli.main import app

    runner = CliRunner()

    def cli(*args: str) -> None:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output

    data = tmp_path / "data"
    cli("data", "synth", "--out", str(data), "--users", "80", "--items", "40", "--clusters", "4")
    common = ("--epochs", "1", "--device", "cpu", "--no-progress")
    cli("train", "--data", str(data), "--out", str(tmp_path / "dime"), "--model", "dimerec",
        *common, "--set", "dim=16", "--set", "dam_hidden=32", "--set", "diffusion_steps=4")  # fmt: skip
    cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "pop"),
        "--model",
        "popularity",
        *common,
    )
    script = Path(__file__).resolve().parents[1] / "bench" / "sampler_noise.py"

    def bench(run: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path / run)], capture_output=True, text=True
        )

    result = bench("dime")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sigma_mode=")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "sigma_mode=std", "sigma_mode=variance", "sigma_mode=none",
    ]  # fmt: skip
    assert "| GEM, max over K |" in result.stdout
    refused = bench("pop")
    assert refused.returncode != 0 and "popularity has no reverse process" in refused.stderr
