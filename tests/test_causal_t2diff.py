"""Issue 16's model changes: the every-position (dense) loss, T2Diff's causal encoder fed
the served xhat, the diffusion reading the newest ``diffusion_len`` behaviours, and the
short-history cut."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from model_fixtures import N_ITEMS, assert_onnx_matches, perturbed_t2diff, tiny_batch, tower_inputs
from tolerances import RTOL_REFORMULATION, RTOL_REORDER, assert_f32_close

from model.base import Batch, dense_targets
from model.data import leave_one_out, load_sequences
from model.fast_tower import FastAttentionPart, FastDiffusionPart, FastTower
from model.registry import build_model, make_config

ROOT = Path(__file__).resolve().parents[1]
CAUSAL = {
    "dim": 16,
    "unet_width": 8,
    "max_seq_len": 12,
    "diffusion_len": 8,
    "diffusion_steps": 4,
    "encoder": "causal",
    "dense_loss": True,
    "tower_xhat": "reverse",
}


def test_training_targets_are_each_users_newest_with_a_dense_loss() -> None:
    sasrec = build_model("sasrec", N_ITEMS, make_config("sasrec", {"dense_loss": True}))
    plain = build_model("sasrec", N_ITEMS, make_config("sasrec"))
    targets = np.array([1, 2, 3, 11, 21, 22])
    users = np.array([0, 0, 0, 1, 2, 2])
    rng = np.random.default_rng(0)
    assert plain.training_targets(targets, users, rng).tolist() == targets.tolist()
    assert sasrec.training_targets(targets, users, rng).tolist() == [3, 11, 22]
    assert sasrec.training_targets(targets[:0], users[:0], rng).tolist() == []
    # "random": one position per user, each of its positions drawn over many epochs
    t2diff = build_model(
        "t2diff_causal", N_ITEMS, make_config("t2diff_causal", {"dense_cut": "random"})
    )
    assert t2diff.dense_cut == "random"
    drawn = [t2diff.training_targets(targets, users, np.random.default_rng(e)) for e in range(64)]
    assert all(len(d) == 3 and d[1] == 11 for d in drawn)
    assert {int(d[0]) for d in drawn} == {1, 2, 3} and {int(d[2]) for d in drawn} == {21, 22}


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_dense_loss_is_the_mean_next_item_loss_over_real_positions(name: str) -> None:
    model = build_model(name, N_ITEMS, make_config(name, {"dense_loss": True})).eval()
    batch = tiny_batch()
    with torch.no_grad():
        loss, _ = model.loss(batch)
        hidden = model.hidden(batch.item_seq)
        following = dense_targets(batch.item_seq, batch.target)
        logits = hidden @ model.item_embeddings().T
        logits[..., 0] = -torch.inf
        per_position = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), following, reduction="none"
        )
        valid = batch.item_seq > 0
        expected = per_position[valid].mean()
        # the newest position's output is the served user vector
        assert torch.equal(hidden[:, batch.item_seq.shape[1] - 1], model.encode(batch.item_seq))
    assert_f32_close(loss, expected, RTOL_REORDER)


def test_causal_encoder_reads_no_later_behaviour() -> None:
    # training mode (the per-position outputs exist only there), without dropout
    model = perturbed_t2diff(CAUSAL, dropout=0.0).train()
    batch = tiny_batch()
    x = model.item_emb(batch.item_seq)
    changed = batch.item_seq.clone()
    changed[:, 9:] = (changed[:, 9:] % N_ITEMS) + 1  # new items at positions 9..11
    with torch.no_grad():
        _, hidden = model._encode(batch, x, None)
        _, hidden_changed = model._encode(
            Batch(changed, batch.time_lag), model.item_emb(changed), None
        )
    assert torch.equal(hidden[:, :9], hidden_changed[:, :9])
    assert not torch.equal(hidden[:, 9:], hidden_changed[:, 9:])


def test_diffusion_reads_only_the_newest_diffusion_len_behaviours() -> None:
    model = perturbed_t2diff(CAUSAL)
    assert model.noise_shape == (4, 8, 16)
    item_seq, _, noise = tower_inputs(model, 3)
    older = item_seq.clone()
    older[:, :4] = (older[:, :4] % N_ITEMS) + 1
    with torch.no_grad():
        xhat = model.reconstruct(model.item_emb(item_seq), noise)
        assert torch.equal(xhat, model.reconstruct(model.item_emb(older), noise))


def test_served_xhat_is_prepared_per_epoch_and_matches_the_reverse_process() -> None:
    model = perturbed_t2diff(CAUSAL).train()
    batch = tiny_batch()
    positions = torch.arange(100, 100 + len(batch.target))
    windows = {int(p): row for p, row in zip(positions, batch.item_seq, strict=True)}

    def make_batch(chunk: torch.Tensor) -> Batch:
        return Batch(torch.stack([windows[int(p)] for p in chunk]), batch.time_lag[: len(chunk)])

    torch.manual_seed(5)
    model.prepare_epoch(make_batch, positions.flip(0))  # any order
    torch.manual_seed(5)
    noise = torch.randn(model.noise_shape)
    with torch.no_grad():
        expected = model.eval().reconstruct(model.item_emb(batch.item_seq), noise)
    model.train()
    x_in = model.diffusion_window(model.item_emb(batch.item_seq).detach())
    prepared = model._served_xhat(
        Batch(batch.item_seq, batch.time_lag, batch.target, positions), x_in
    )
    assert torch.equal(prepared, expected)
    # windows the epoch did not prepare get the reverse process on the spot
    fresh = model._served_xhat(
        Batch(batch.item_seq, batch.time_lag, batch.target, positions + 1), x_in
    )
    assert fresh.shape == expected.shape


def test_causal_t2diff_trains_and_every_cause_option_runs() -> None:
    batch = tiny_batch()
    for overrides in (
        {},
        {"tower_xhat": "one_step", "xhat_softmax_weight": 1.0, "kl_positions": "last"},
        {"use_diffusion": False},
    ):
        model = perturbed_t2diff(CAUSAL, **overrides).train()
        loss, parts = model.loss(batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert ("xhat" in parts) == bool(overrides.get("xhat_softmax_weight"))
    with pytest.raises(ValueError, match="dense_loss needs encoder"):
        perturbed_t2diff({**CAUSAL, "encoder": "session"})


def test_fast_tower_and_split_parts_match_eager_with_the_causal_encoder() -> None:
    model = perturbed_t2diff(CAUSAL, seed=3)
    fast = FastTower(model).eval()
    diffusion, attention = FastDiffusionPart(model), FastAttentionPart(model)
    one = FastDiffusionPart(model, one_sample=True)
    for rows in (1, 3):
        item_seq, time_lag, noise = tower_inputs(model, rows, seed=rows)
        with torch.no_grad():
            reference = model.user_embedding(Batch(item_seq, time_lag), noise)
            assert_f32_close(fast(item_seq, time_lag, noise), reference, RTOL_REFORMULATION)
            xhat = diffusion(item_seq, noise)
            assert_f32_close(attention(item_seq, time_lag, xhat), reference, RTOL_REFORMULATION)
            assert_f32_close(one(item_seq[:1], noise), xhat[:1], RTOL_REFORMULATION)


def test_onnx_export_of_the_causal_tower_matches_eager(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = perturbed_t2diff(CAUSAL, seed=4)
    assert_onnx_matches(model, tmp_path / "tower.onnx", seeds=(0, 1))


def test_logs_in_the_movielens_layout_read_under_any_name(tmp_path: Path) -> None:
    path = tmp_path / "anything.tsv"
    pd.DataFrame(
        {"user_id": [1, 1, 1, 2, 2, 2], "movie_id": [5, 6, 7, 5, 7, 8], "position": range(6)}
    ).to_csv(path, sep="\t", index=False)
    data = load_sequences(path, "tsv")
    assert data.n_users == 2 and data.n_items == 4


def test_short_history_cut_keeps_each_users_first_items(tmp_path: Path) -> None:
    source = tmp_path / "long.csv"
    rows = [(u, (u * 7 + i) % 50, i) for u in range(40) for i in range(30)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(source, index=False)
    out = tmp_path / "short.tsv"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/short_history.py"),
            "--data",
            str(source),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    data = load_sequences(out, "tsv")
    assert data.n_users == 40
    assert 5 <= data.lengths.min() and data.lengths.max() <= 15
    assert len(leave_one_out(data).test_targets) == 40
    # the first items, in order: user 3's kept sequence is the start of its full one
    user = int(np.flatnonzero(data.user_ids == "3")[0])
    first = data.items[data.offsets[user] : data.offsets[user + 1]]
    expected = [(3 * 7 + i) % 50 for i in range(len(first))]
    assert [int(data.item_ids[t - 1]) for t in first] == expected


def test_causal_export_passes_the_services_release_check(tmp_path: Path) -> None:
    """A causal T2Diff whose diffusion reads fewer behaviours than the tower exports (single
    graph, split parts, one-request part), loads in the service's own loader and answers
    recalls, as ``t2diff rebuild`` checks before it promotes; the service's embedding is
    PyTorch's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("faiss")
    from export_fixtures import export_tiny_t2diff
    from service_fixtures import build_tiny_index

    from service.release_check import check_serving
    from service.settings import Settings
    from service.state import load_engine

    model = perturbed_t2diff(CAUSAL, seed=6)
    artifacts = export_tiny_t2diff(
        tmp_path / "artifacts" / "v1",
        model,
        "v1",
        noise_seed=3,
        item_name=lambda row: f"i{row}",
        split=True,
    )
    index = build_tiny_index(artifacts, tmp_path / "indexes" / "v1")
    report = check_serving(artifacts, index)
    assert set(report["graphs"]) == {"single", "diffusion", "attention", "diffusion_one"}
    engine, errors = load_engine(Settings(), artifacts, index)
    assert engine is not None, errors
    tokens, stamps = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], [[float(i) for i in range(10)]]
    served = engine.tower.embed_tokens(tokens, stamps, 20.0)
    item_seq = torch.zeros(1, CAUSAL["max_seq_len"], dtype=torch.int64)
    item_seq[0, 2:] = torch.tensor(tokens[0])
    time_lag = torch.zeros(1, CAUSAL["max_seq_len"])
    time_lag[0, 2:] = 20.0 - torch.tensor(stamps[0])
    with torch.no_grad():
        expected = model.user_embedding(
            Batch(item_seq, time_lag), torch.from_numpy(engine.tower.noise)
        )
    assert_f32_close(served, expected, RTOL_REFORMULATION)


def test_bad_dense_and_diffusion_options_are_refused() -> None:
    with pytest.raises(ValueError, match="dense_cut"):
        build_model("sasrec", N_ITEMS, make_config("sasrec", {"dense_cut": "oldest"}))
    with pytest.raises(ValueError, match="dense_cut"):
        perturbed_t2diff({**CAUSAL, "dense_cut": "middle"})
    with pytest.raises(ValueError, match="diffusion_len"):
        perturbed_t2diff({**CAUSAL, "diffusion_len": -1})
    with pytest.raises(ValueError, match="unknown option"):
        make_config("two_tower", {"dense_loss": True})  # no per-position outputs


def test_parallel_train_resume_keeps_a_run_that_stopped_early(tmp_path: Path) -> None:
    """``--resume`` does not retrain (or need the checkpoint of) a run that had converged;
    its metrics go into the summary as they are."""
    import json

    run = tmp_path / "rounds" / "sasrec_s0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps({"stopped_early": True, "best_epoch": 4, "epochs_run": 9})
    )
    from model.metrics import REPORTED_METRICS

    metrics = {m: 0.25 for m in (*REPORTED_METRICS, "ndcg@10")}
    (run / "metrics.json").write_text(
        json.dumps({"model_name": "sasrec", "sasrec": {"test": metrics, "valid": metrics}})
    )
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/parallel_train.py"),
            "--data",
            str(tmp_path / "absent.tsv"),  # never read: nothing is trained
            "--out",
            str(tmp_path / "rounds"),
            "--resume",
            "sasrec:0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = pd.read_csv(tmp_path / "rounds" / "summary.csv")
    assert summary["name"].tolist() == ["sasrec_s0"], done.stdout
    assert bool(summary["stopped_early"].iloc[0]) and summary["epochs_run"].iloc[0] == 9
    assert "kept as it is" in (tmp_path / "rounds" / "sasrec_s0.log").read_text()


CUTS = {**CAUSAL, "tower_xhat": "one_step", "xhat_cuts": 3}


def test_xhat_cut_tokens_read_only_behaviours_up_to_their_cut() -> None:
    model = perturbed_t2diff(CUTS, dropout=0.0).train()
    batch = tiny_batch()
    x = model.item_emb(batch.item_seq)
    length = batch.item_seq.shape[1]
    cuts = torch.tensor([[4, 8, length - 1]]).expand(len(batch.target), -1)
    x_next = torch.randn(len(batch.target), 3, model.config.dim)
    changed = batch.item_seq.clone()
    changed[:, 9:] = (changed[:, 9:] % N_ITEMS) + 1  # new items after the second cut
    with torch.no_grad():
        tokens, dense = model._encode(batch, x, x_next, cuts)
        tokens_changed, _ = model._encode(
            Batch(changed, batch.time_lag), model.item_emb(changed), x_next, cuts
        )
        # the window-end token is what serving computes for the same xhat
        model.eval()
        served, _ = model._encode(batch, x, x_next[:, 2], None)
        model.train()
    assert dense is not None and tokens.shape == (len(batch.target), 3, model.config.dim)
    assert torch.equal(tokens[:, :2], tokens_changed[:, :2])
    assert not torch.equal(tokens[:, 2], tokens_changed[:, 2])
    assert_f32_close(tokens[:, 2], served, RTOL_REFORMULATION)


def test_xhat_cuts_train_the_unet_and_the_tower_and_serve_as_before() -> None:
    model = perturbed_t2diff(CUTS).train()
    batch = tiny_batch()
    cuts, cut_batch = model._draw_cuts(batch)
    assert cuts.shape == (len(batch.target), 4)
    assert (cuts[:, 3] == batch.item_seq.shape[1] - 1).all()
    following = dense_targets(batch.item_seq, batch.target)
    windows = cut_batch.item_seq.view(*cuts.shape, -1)
    targets = cut_batch.target.view(cuts.shape)
    for row in range(len(cuts)):
        for cut, window, target in zip(cuts[row], windows[row], targets[row], strict=True):
            if cut < 0:
                assert int(target) == 0 and not window.any()
                continue
            assert int(target) == int(following[row, cut]) > 0
            assert int(window[-1]) == int(batch.item_seq[row, cut])  # 0: an empty window
    loss, parts = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and float(parts["diffusion"]) > 0
    # the per-epoch served-xhat table is for window ends only: with cuts nothing reads it
    reverse = perturbed_t2diff({**CUTS, "tower_xhat": "reverse"}).train()
    reverse.prepare_epoch(lambda chunk: batch, torch.arange(len(batch.target)))
    assert reverse._epoch_xhat is None
    assert model.unet.out.weight.grad is not None  # L_KL reaches the U-Net
    assert model.causal_pos.weight.grad is not None
    with pytest.raises(ValueError, match="xhat_cuts"):
        build_model("t2diff_causal", N_ITEMS, make_config("t2diff_causal", {"xhat_cuts": -1}))
    with pytest.raises(ValueError, match="xhat_cuts"):
        build_model(
            "mixed_attention_causal",
            N_ITEMS,
            make_config("mixed_attention_causal", {"xhat_cuts": 2}),
        )


def test_xhat_probes_serve_xhat_alone_or_a_zero_xhat(tmp_path: Path) -> None:
    from model.data import write_synthetic
    from model.train import DataSource, TrainConfig, evaluate_run, train_run

    path = write_synthetic(tmp_path / "data", n_users=60, n_items=40, n_clusters=3)
    run_dir = tmp_path / "run"
    small = {k: v for k, v in CUTS.items() if k not in ("encoder", "dense_loss", "tower_xhat")}
    train_run(
        DataSource(str(path)),
        run_dir,
        "t2diff_causal",
        small,
        TrainConfig(epochs=1, progress=False, device="cpu"),
    )
    plain = evaluate_run(run_dir, device="cpu")
    stored = (run_dir / "metrics.json").read_bytes()
    only = evaluate_run(run_dir, device="cpu", xhat_probe="only")
    zero = evaluate_run(run_dir, device="cpu", xhat_probe="zero")
    assert (run_dir / "metrics.json").read_bytes() == stored  # a probe never overwrites it
    with pytest.raises(ValueError, match="xhat_probe"):
        evaluate_run(run_dir, device="cpu", xhat_probe="half")
    assert (run_dir / "metrics-xhat-only.json").is_file()
    assert (run_dir / "metrics-xhat-zero.json").is_file()
    assert only["xhat_probe"] == "only" and plain["xhat_probe"] == "none"
    test = [m["t2diff_causal"]["test"]["ndcg@50"] for m in (plain, only, zero)]
    assert len(set(test)) == 3  # three different queries rank differently

    model = perturbed_t2diff(CUTS)
    item_seq, time_lag, noise = tower_inputs(model, 3)
    batch = Batch(item_seq, time_lag)
    with torch.no_grad():
        model.xhat_probe = "only"
        assert torch.equal(
            model.user_embedding(batch, noise), model.reconstruct(model.item_emb(item_seq), noise)
        )
    with pytest.raises(ValueError, match="no diffusion"):
        baseline = tmp_path / "sasrec"
        train_run(
            DataSource(str(path)),
            baseline,
            "sasrec",
            {"dim": 16},
            TrainConfig(epochs=1, progress=False, device="cpu"),
        )
        evaluate_run(baseline, device="cpu", xhat_probe="only")
