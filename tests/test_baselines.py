"""Every registered model on the harness contract, plus the baselines' ONNX export.

Tiny sizes throughout (d = 16, L = 12, 30 items), so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
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

from model.base import SequentialRecommender
from model.registry import MODELS, build_model, make_config, model_names

BASELINES = ["sasrec", "gru4rec", "two_tower"]
# Applied where the model has the option: small enough for a CPU test, large enough to learn.
TINY = {
    "dim": 16,
    "max_seq_len": SEQ_LEN,
    "session_len": 4,
    "unet_width": 8,
    "unet_levels": 2,
}
STEPS = 30


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and a busy machine no longer slows the
    file down by an order of magnitude (OpenMP threads spinning against other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(name: str, **extra: object) -> dict:
    known = {f.name for f in fields(MODELS[name].config_class)}
    return make_config(name, {**{k: v for k, v in TINY.items() if k in known}, **extra})


def build(name: str, seed: int = 0, **extra: object) -> SequentialRecommender:
    torch.manual_seed(seed)
    popularity = np.arange(N_ITEMS + 1, dtype=np.float64)
    return build_model(name, N_ITEMS, tiny_config(name, **extra), popularity)


def test_registry_lists_every_model() -> None:
    names = model_names()
    assert set(BASELINES) <= set(names)
    assert {"t2diff", "mixed_attention", "t2diff_T200", "popularity"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", model_names())
def test_make_config_is_full_and_strict(name: str) -> None:
    config = make_config(name)
    assert set(config) == {f.name for f in fields(MODELS[name].config_class)}
    assert config["max_seq_len"] == 50
    assert make_config(name, {"max_seq_len": 7})["max_seq_len"] == 7
    with pytest.raises(ValueError, match="unknown option"):
        make_config(name, {"no_such_option": 1})
    # A value of the wrong type (`--set max_seq_len=abc`) is refused by name, not deep in
    # the model's constructor; an int where a float is expected is taken as that float.
    with pytest.raises(ValueError, match="max_seq_len of .* takes a int"):
        make_config(name, {"max_seq_len": "abc"})
    with pytest.raises(ValueError, match="takes a int"):
        make_config(name, {"max_seq_len": True})
    floats = [k for k, v in config.items() if isinstance(v, float)]
    if floats:
        assert make_config(name, {floats[0]: 1})[floats[0]] == 1.0
    # The variant's defining overrides are part of its config, and a config round-trips.
    for key, value in MODELS[name].fixed.items():
        assert config[key] == value
    model = build_model(name, N_ITEMS, config, np.ones(N_ITEMS + 1))
    if hasattr(model, "config"):
        assert model.config.to_dict() == config


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        make_config("no_such_model")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_model", N_ITEMS, {})


@pytest.mark.parametrize("name", model_names())
def test_shapes(name: str) -> None:
    model = build(name).eval()
    batch = tiny_batch()
    with torch.no_grad():
        user = model.user_embedding(batch, noise_for(model))
        scores = model.full_sort_scores(batch, noise_for(model))
        items = model.item_embeddings()
    assert user.shape == (BATCH, model.dim)
    assert items.shape == (N_ITEMS + 1, model.dim)
    assert scores.shape == (BATCH, N_ITEMS + 1)
    assert torch.isfinite(user).all() and torch.isfinite(scores).all()
    loss, parts = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(not p.requires_grad for p in parts.values())


@pytest.mark.parametrize("name", [n for n in model_names() if n != "popularity"])
def test_loss_decreases(name: str) -> None:
    model = build(name)
    batch = tiny_batch()
    before, _ = eval_loss(model, batch)
    torch.manual_seed(7)
    train_steps(model, batch, STEPS)
    after, _ = eval_loss(model, batch)
    assert after < 0.8 * before, (before, after)
    # Row 0 (padding) stays an all-zero, never-recommended vector.
    if name != "popularity":
        assert torch.count_nonzero(model.item_embeddings()[0]) == 0


@pytest.mark.parametrize("name", model_names())
def test_deterministic(name: str) -> None:
    first, second = build(name, seed=3), build(name, seed=3)
    batch = tiny_batch()
    assert eval_loss(first, batch)[0] == eval_loss(second, batch)[0]
    with torch.no_grad():
        a = first.user_embedding(batch, noise_for(first))
        b = second.user_embedding(batch, noise_for(second))
        again = first.user_embedding(batch, noise_for(first))
    assert torch.equal(a, b) and torch.equal(a, again)
    if name in BASELINES:  # deterministic models ignore the noise
        with torch.no_grad():
            other = first.user_embedding(batch, noise_for(first, seed=9))
            without = first.user_embedding(batch, None)
        assert torch.equal(a, other) and torch.equal(a, without)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("sasrec", {}),
        ("sasrec", {"heads": 2, "blocks": 1, "ffn_mult": 2}),
        ("gru4rec", {}),
        ("gru4rec", {"hidden": 24, "output_proj": False}),
        ("two_tower", {}),
        ("two_tower", {"mlp_layers": 1}),
    ],
)
def test_onnx_parity(name: str, extra: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = build(name, **extra)
    # Train a few steps so LayerNorm/bias parameters are not at their trivial init.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = model.loss(tiny_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert_onnx_matches(model, tmp_path / "tower.onnx", seeds=(0,))


@pytest.mark.parametrize("name", BASELINES)
def test_train_run_smoke(name: str, tmp_path: Path) -> None:
    from model.data import write_synthetic
    from model.train import DataSource, TrainConfig, evaluate_run, train_run

    path = write_synthetic(tmp_path / "data", n_users=100, n_items=60, n_clusters=3)
    run_dir = tmp_path / "run"
    summary = train_run(
        DataSource(str(path)),
        run_dir,
        name,
        {"dim": 16},
        TrainConfig(epochs=1, progress=False, device="cpu"),
    )
    assert summary["epochs_run"] == 1
    assert (run_dir / "model.pt").is_file()
    metrics = evaluate_run(run_dir, device="cpu")
    assert 0.0 <= metrics[name]["test"]["recall@20"] <= 1.0


def test_bad_model_option_leaves_no_run_behind(tmp_path: Path) -> None:
    """An option the model refuses fails before anything is written."""
    from model.data import write_synthetic
    from model.train import DataSource, TrainConfig, train_run

    path = write_synthetic(tmp_path / "data", n_users=40, n_items=30, n_clusters=2)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="negatives"):
        train_run(
            DataSource(str(path)), run_dir, "t2diff", {"dim": 16, "negatives": -1},
            TrainConfig(epochs=1, progress=False, device="cpu"),
        )  # fmt: skip
    assert not run_dir.exists()
