"""Data, split, schedule, diffusion steps, metrics and ONNX parity of the T2Diff tower."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from tolerances import RTOL_REFORMULATION, RTOL_REORDER, assert_f32_close

from contracts.tower import make_noise, pad_batch
from model.base import Batch
from model.data import (
    DataError,
    leave_one_out,
    load_interactions,
    synthesize,
    to_sequences,
)
from model.export import export_onnx
from model.metrics import metrics_from_ranks
from model.schedule import NoiseSchedule, make_betas
from model.t2diff import T2Diff, T2DiffConfig, unet_step

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["b", "a", "a", "a", "a", "b", "b", "c", "c"],
            "item_id": ["x", "p", "q", "r", "s", "y", "z", "p", "q"],
            "timestamp": [5.0, 4.0, 1.0, 2.0, 3.0, 6.0, 7.0, 1.0, 2.0],
        }
    )


def test_sequences_are_time_ordered_and_short_users_dropped() -> None:
    data = to_sequences(tiny_frame(), min_length=3)
    assert data.user_ids.tolist() == ["a", "b"]  # c has 2 interactions
    a_items = data.item_ids[data.items[data.offsets[0] : data.offsets[1]] - 1].tolist()
    assert a_items == ["q", "r", "s", "p"]  # sorted by timestamp, not file order
    assert data.items.min() >= 1  # 0 is padding


def test_leave_one_out_split() -> None:
    data = to_sequences(tiny_frame(), min_length=3)
    split = leave_one_out(data)
    # a: positions 0..3 -> train target 1, valid 2, test 3; b: positions 4..6 -> valid 5, test 6
    assert split.test_targets.tolist() == [3, 6]
    assert split.valid_targets.tolist() == [2, 5]
    assert split.train_targets.tolist() == [1]
    assert split.train_users.tolist() == [0]


def test_synthetic_is_seeded_and_has_no_repeats() -> None:
    first, second = synthesize(n_users=50, n_items=100, n_clusters=5, seed=3), None
    second = synthesize(n_users=50, n_items=100, n_clusters=5, seed=3)
    pd.testing.assert_frame_equal(first, second)
    assert not first.duplicated(["user_id", "item_id"]).any()
    assert list(first.columns) == ["user_id", "item_id", "timestamp"]
    gaps = first.sort_values(["user_id", "timestamp"]).groupby("user_id")["timestamp"].diff()
    assert gaps.max() > 3 * 3600 > gaps.median()  # sessions separated by long gaps


def test_loaders_read_every_format(tmp_path: Path) -> None:
    frame = tiny_frame()
    frame.to_csv(tmp_path / "log.csv", index=False)
    frame.to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    frame.to_parquet(tmp_path / "log.parquet")
    ml1m = tmp_path / "sequences.tsv"
    ml1m.write_text("user_id\tmovie_id\tposition\n1\t10\t0\n1\t11\t1\n")
    ml100k = tmp_path / "u.data"
    ml100k.write_text("1\t10\t4\t881250949\n1\t11\t3\t881250950\n")
    for name in ("log.csv", "log.tsv", "log.parquet"):
        loaded = load_interactions(tmp_path / name)
        assert loaded["user_id"].tolist() == frame["user_id"].tolist()
    assert load_interactions(ml1m)["timestamp"].tolist() == [0.0, 1.0]
    assert load_interactions(ml100k)["item_id"].tolist() == ["10", "11"]
    (tmp_path / "bad.csv").write_text("user,item\n1,2\n")
    with pytest.raises(DataError, match="missing column"):
        load_interactions(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="no such file"):
        load_interactions(tmp_path / "absent.csv")


@pytest.mark.mldata
def test_real_movielens_loaders() -> None:
    if not (SHARED_DATA / "ml-1m" / "sequences.tsv").is_file():
        pytest.skip(f"MovieLens not found at {SHARED_DATA} (../shared/data is absent)")
    ml1m = to_sequences(load_interactions(SHARED_DATA / "ml-1m" / "sequences.tsv"))
    assert (ml1m.n_users, ml1m.n_items, len(ml1m.items)) == (6040, 3706, 1_000_209)
    ml100k = to_sequences(load_interactions(SHARED_DATA / "ml-100k" / "u.data"))
    assert (ml100k.n_users, ml100k.n_items) == (943, 1682)


def test_exponential_schedule_matches_the_authors_constants() -> None:
    betas = make_betas("exponential", 50, a=1e-2, b=4.5)
    assert betas[0].item() == pytest.approx(1e-2 * math.exp(4.5 / 50))
    assert betas[-1].item() == pytest.approx(1e-2 * math.exp(4.5))
    for kind in ("linear", "log", "cosine"):
        other = make_betas(kind, 50)
        assert other.shape == (50,) and bool((other > 0).all() and (other < 1).all())


def test_forward_and_reverse_step() -> None:
    schedule = NoiseSchedule.create("exponential", 50)
    z0 = torch.randn(4, 7, 8)
    noise = torch.randn_like(z0)
    t = torch.tensor([0, 10, 30, 49])
    zt = schedule.add_noise(z0, noise, t)
    abar = torch.cumprod(1 - schedule.betas, 0)
    expected = (
        abar[t].sqrt().float()[:, None, None] * z0
        + (1 - abar[t]).sqrt().float()[:, None, None] * noise
    )
    torch.testing.assert_close(zt, expected)
    assert schedule.sqrt_abar[-1] < 0.01  # z_T is (almost) pure noise
    # With a perfect x0 estimate the last reverse step returns z0 exactly (no noise at t=0).
    torch.testing.assert_close(schedule.step(z0, zt[:1], 0, noise[:1]), z0)
    # A middle step is the DDPM posterior mean plus sigma * noise.
    step = schedule.step(z0, zt, 10, noise)
    mean = schedule.posterior_c0[10] * z0 + schedule.posterior_ct[10] * zt
    torch.testing.assert_close(step, (mean + schedule.sigma[10] * noise).float())


def test_sigma_modes() -> None:
    """std = sqrt(beta_tilde) (DDPM), variance = beta_tilde (the authors' code, DimeRec's
    Algorithm 2), none = the posterior mean only; an unknown mode is refused."""
    std, variance, none = (
        NoiseSchedule.create("cosine", 20, sigma_mode=m) for m in ("std", "variance", "none")
    )
    torch.testing.assert_close(variance.sigma, std.sigma**2)
    assert bool((none.sigma == 0).all())
    z0, zt, noise = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    mean = none.posterior_c0[5] * z0 + none.posterior_ct[5] * zt
    torch.testing.assert_close(none.step(z0, zt, 5, noise), mean.float())
    with pytest.raises(ValueError, match="sigma_mode"):
        NoiseSchedule.create("cosine", 20, sigma_mode="half")  # type: ignore[arg-type]


def test_unet_step_shapes_and_reverse_process_is_seeded() -> None:
    torch.manual_seed(0)
    model = T2Diff(30, T2DiffConfig(dim=16, unet_width=8, max_seq_len=12, session_len=4)).eval()
    x = torch.randn(3, 12, 16)
    assert unet_step(model, torch.randn(3, 12, 16), x, 5).shape == (3, 12, 16)
    noise = torch.randn(model.noise_shape)
    with torch.no_grad():
        first = model.reconstruct(x, noise)
        again = model.reconstruct(x, noise)
        other = model.reconstruct(x, torch.randn(model.noise_shape))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


def test_metrics_from_ranks() -> None:
    metrics = metrics_from_ranks(np.array([0, 1, 5, 100]), cutoffs=(2, 10))
    assert metrics["recall@2"] == 0.5 and metrics["hr@10"] == 0.75
    assert metrics["mrr@2"] == pytest.approx((1 + 0.5) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)


def run_exported(
    model: T2Diff, path: Path, tokens: list[list[int]], stamps: list[list[float]], now: float
) -> tuple[np.ndarray, Batch, torch.Tensor]:
    """Export ``model`` to ``path`` and run the ONNX tower on the padded rows (noise seed 7);
    returns its output and the same inputs as eager tensors, to compare with PyTorch."""
    max_seq_len = model.config.max_seq_len
    export_onnx(model, path, max_seq_len)
    item_seq, time_lag = pad_batch(tokens, stamps, now=now, max_seq_len=max_seq_len)
    noise = make_noise(model.noise_shape, seed=7)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"item_seq": item_seq, "time_lag": time_lag, "noise": noise})[0]
    batch = Batch(torch.from_numpy(item_seq), torch.from_numpy(time_lag))
    return onnx_out, batch, torch.from_numpy(noise)


def test_onnx_tower_matches_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = T2DiffConfig(dim=16, unet_width=8, max_seq_len=12, session_len=4)
    model = T2Diff(40, config).eval()
    tokens = [[1, 2, 3], list(range(1, 20)), [7]]
    stamps = [[float(i) for i in range(len(row))] for row in tokens]
    onnx_out, batch, noise = run_exported(model, tmp_path / "tower.onnx", tokens, stamps, 100.0)
    with torch.no_grad():
        torch_out = model.user_embedding(batch, noise).numpy()
    assert onnx_out.shape == (3, 16)
    assert_f32_close(onnx_out, torch_out, RTOL_REFORMULATION)


def test_time_gap_sessions_split_at_the_newest_long_gap() -> None:
    # Seconds since each behaviour, oldest first: gaps 10, 5000 (a break), 20, 30.
    time_lag = torch.tensor([[5060.0, 5050.0, 50.0, 30.0, 0.0]])
    members = T2Diff._session_members(time_lag, gap_s=1800.0)
    assert members.tolist() == [[False, False, True, True, True]]
    # The newest behaviour always belongs, even after a long gap before the request.
    assert T2Diff._session_members(torch.tensor([[9e5, 5e5]]), 1800.0).tolist() == [[False, True]]


def test_onnx_tower_matches_pytorch_with_time_gap_sessions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = T2DiffConfig(
        dim=16, unet_width=8, max_seq_len=12, session_len=4, session_gap_s=1800.0,
        diffusion_steps=5,
    )  # fmt: skip
    model = T2Diff(40, config).eval()
    tokens = [[1, 2, 3, 4, 5, 6], list(range(1, 20)), [7]]
    # Row 0 has a 2-hour gap before its last two behaviours; row 1 none.
    stamps = [[0.0, 10.0, 20.0, 30.0, 7230.0, 7240.0], [float(i) for i in range(19)], [0.0]]
    onnx_out, batch, noise = run_exported(model, tmp_path / "tower.onnx", tokens, stamps, 7300.0)
    with torch.no_grad():
        torch_out = model.user_embedding(batch, noise).numpy()
        fixed = T2Diff(40, T2DiffConfig(**{**config.to_dict(), "session_gap_s": 0.0})).eval()
        fixed.load_state_dict(model.state_dict())
        fixed_out = fixed.user_embedding(batch, noise).numpy()
    assert_f32_close(onnx_out, torch_out, RTOL_REFORMULATION)
    # The gap changes row 0's answer and leaves the one-session rows as they were.
    assert np.abs(torch_out[0] - fixed_out[0]).max() > 1e-4
    assert_f32_close(torch_out[1], fixed_out[1], RTOL_REORDER)


def test_tower_xhat_from_high_steps_option() -> None:
    """``tower_xhat_min_step_frac``: the tower's xhat comes from a gradient-free pass at a
    high step; L_KL is the same as without it, the U-Net still gets its gradient from L_KL
    only, and bad fractions are refused."""
    config = T2DiffConfig(dim=16, unet_width=8, max_seq_len=12, session_len=4, diffusion_steps=5)
    batch = Batch(
        item_seq=torch.randint(1, 30, (4, 12)),
        time_lag=torch.zeros(4, 12),
        target=torch.randint(1, 30, (4,)),
    )
    losses, unet_grads = {}, {}
    for frac in (0.0, 0.9):
        torch.manual_seed(0)
        model = T2Diff(30, T2DiffConfig(**{**config.__dict__, "tower_xhat_min_step_frac": frac}))
        model.eval()  # no dropout: the two runs differ only in the tower's xhat
        torch.manual_seed(1)
        total, parts = model.loss(batch)
        total.backward()
        unet_grads[frac] = [p.grad for p in model.unet.parameters()]
        losses[frac] = parts
    assert float(losses[0.9]["diffusion"]) == pytest.approx(float(losses[0.0]["diffusion"]))
    assert float(losses[0.9]["tower"]) != pytest.approx(float(losses[0.0]["tower"]))
    # Stop-gradient: the tower's loss never reaches the U-Net, whichever xhat it sees.
    for plain, high in zip(unet_grads[0.0], unet_grads[0.9], strict=True):
        assert (plain is None) == (high is None)
        if plain is not None:
            torch.testing.assert_close(plain, high)
    for bad in (-0.5, 1.0):
        with pytest.raises(ValueError, match="tower_xhat_min_step_frac"):
            T2Diff(30, T2DiffConfig(tower_xhat_min_step_frac=bad))


def test_sampled_softmax_with_log_q_correction() -> None:
    """``negatives=N``: N negatives drawn by popularity ** 0.75 with the log-Q correction;
    it trains, never samples padding, and with the corpus drawn many times over it
    estimates the full softmax's loss."""
    from model.registry import build_model, make_config

    n_items = 30
    popularity = np.arange(n_items + 1, dtype=np.float64)
    popularity[0] = 0
    tiny = {"dim": 16, "unet_width": 8, "max_seq_len": 12, "session_len": 4, "diffusion_steps": 5}
    torch.manual_seed(0)
    model = build_model(
        "t2diff", n_items, make_config("t2diff", {**tiny, "negatives": 8}), popularity
    )
    q = model.sample_log_q.exp()
    assert float(q[0]) == 0.0 and float(q.sum()) == pytest.approx(1.0)
    assert float(q[30] / q[1]) == pytest.approx(((30 + 1) / (1 + 1)) ** 0.75, rel=1e-5)
    batch = Batch(
        item_seq=torch.randint(1, n_items + 1, (16, 12)),
        time_lag=torch.zeros(16, 12),
        target=torch.randint(1, n_items + 1, (16,)),
    )
    user = torch.randn(16, 16) * 0.3
    full = full_softmax_loss(model, user, batch.target)
    model.negatives = 4000  # many draws: the corrected sampled loss approaches the full one
    torch.manual_seed(3)
    with torch.no_grad():
        sampled = float(model.softmax_loss(user, batch.target))
    assert sampled == pytest.approx(full, abs=0.05)
    model.negatives = 8
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(1)
    first = None
    for _ in range(30):
        loss, _ = model.loss(batch)
        first = float(loss) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.9 * first
    with pytest.raises(ValueError, match="negatives"):
        build_model("t2diff", n_items, make_config("t2diff", {**tiny, "negatives": -1}))
    with pytest.raises(ValueError, match="rows"):
        model.use_sampled_softmax(8, popularity[:-1])


def full_softmax_loss(model: T2Diff, user: torch.Tensor, target: torch.Tensor) -> float:
    negatives, model.negatives = model.negatives, 0
    try:
        with torch.no_grad():
            return float(model.softmax_loss(user, target))
    finally:
        model.negatives = negatives
