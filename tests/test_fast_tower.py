"""``model.fast_tower``: the inference re-expression of T2Diff gives eager's answer.

Parity against ``T2Diff.user_embedding`` (PyTorch eager, same noise), in torch and through
the ONNX export in ONNX Runtime, on tiny random models (weights perturbed so biases, norms
and the step MLP are not at their init values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_fixtures import perturbed_t2diff, tower_inputs
from tolerances import RTOL_REFORMULATION, RTOL_REORDER, assert_f32_close

from model.base import Batch
from model.fast_tower import FastTower
from model.t2diff import T2Diff

TINY = {"dim": 16, "unet_width": 8, "max_seq_len": 12, "session_len": 4, "diffusion_steps": 4}


def _model(seed: int = 0, **overrides: object) -> T2Diff:
    return perturbed_t2diff(TINY, seed, **overrides)


_inputs = tower_inputs


@pytest.mark.parametrize("mode", ["auto", "gather", "matmul"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_seq_len": 13, "unet_levels": 2},  # odd lengths: ceil-mode pooling, cropping
        {"unet_levels": 4, "max_seq_len": 11, "unet_width": 4},
        {"drift": False, "sigma_mode": "variance", "schedule": "cosine"},
    ],
)
def test_torch_fast_tower_matches_eager(mode: str, overrides: dict) -> None:
    model = _model(**overrides)
    fast = FastTower(model, mode).eval()
    for batch in (1, 3):
        item_seq, time_lag, noise = _inputs(model, batch)
        with torch.no_grad():
            x = model.item_emb(item_seq)
            # the diffusion output itself, not only the tower output it feeds
            x_next = fast.steps(x, noise)
            assert_f32_close(x_next, model.reconstruct(x, noise), RTOL_REFORMULATION)
            reference = model.user_embedding(Batch(item_seq, time_lag), noise)
            out = fast(item_seq, time_lag, noise)
        assert_f32_close(out, reference, RTOL_REFORMULATION)


@pytest.mark.parametrize("mode", ["auto", "matmul"])
def test_one_sample_without_a_batch_axis(mode: str) -> None:
    """``FastUNetSteps`` on a ``[L, d]`` history (2-D activations, the layout in which ONNX
    Runtime fuses each product and its bias into one Gemm) gives the batched answer."""
    model = _model(seed=7)
    steps = FastTower(model, mode).steps
    item_seq, _, noise = _inputs(model, 3, seed=7)
    with torch.no_grad():
        x = model.item_emb(item_seq)
        batched = steps(x, noise)
        for row in range(3):
            one = steps(x[row], noise)
            assert one.shape == (model.config.dim,)
            assert_f32_close(one, batched[row], RTOL_REORDER)


def test_without_diffusion_falls_back_to_the_tower() -> None:
    model = _model(use_diffusion=False)
    item_seq, time_lag, noise = _inputs(model, 2)
    with torch.no_grad():
        reference = model.user_embedding(Batch(item_seq, time_lag), noise)
        assert torch.equal(FastTower(model)(item_seq, time_lag, noise), reference)


def test_onnx_export_matches_eager(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from model.export import export_onnx

    model = _model(seed=3, diffusion_steps=6)
    path = tmp_path / "tower.onnx"
    export_onnx(model, path, model.config.max_seq_len)
    assert model.training is False
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["item_seq", "time_lag", "noise"]
    for batch in (1, 2, 7):
        item_seq, time_lag, noise = _inputs(model, batch, seed=batch)
        with torch.no_grad():
            reference = model.user_embedding(Batch(item_seq, time_lag), noise).numpy()
        feeds = {"item_seq": item_seq.numpy(), "time_lag": time_lag.numpy(), "noise": noise.numpy()}
        out = session.run(["user_embedding"], feeds)[0]
        assert out.shape == reference.shape
        assert_f32_close(out, reference, RTOL_REFORMULATION)


def test_fast_export_is_smaller_than_the_traced_module(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from model.export import export_onnx

    model = _model(seed=4)
    export_onnx(model, tmp_path / "fast.onnx", model.config.max_seq_len)
    export_onnx(model, tmp_path / "plain.onnx", model.config.max_seq_len, fast=False)
    ops = {
        name: [n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node]
        for name in ("fast", "plain")
    }
    assert "Conv" in ops["plain"] and "Conv" not in ops["fast"]  # convolutions are MatMuls
    assert "Tile" not in ops["fast"]  # no repeat_interleave
    assert "LayerNormalization" in ops["fast"]  # the channel norm stays one fused op


@pytest.mark.parametrize("mode", ["auto", "gather", "matmul"])
@pytest.mark.parametrize("overrides", [{}, {"unet_levels": 4, "max_seq_len": 11, "unet_width": 4}])
def test_pad_row_layout_matches_the_padded_convolutions(mode: str, overrides: dict) -> None:
    """The pad-row layout (no ``Pad`` per step, boundary terms in the biases) and the plain
    zero-padded layout give the reference's answer, and the pad row of ``z_t`` stays zero."""
    model = _model(seed=5, **overrides)
    steps = FastTower(model, mode).steps
    item_seq, _, noise = _inputs(model, 3, seed=5)
    with torch.no_grad():
        x = model.item_emb(item_seq)
        reference = model.reconstruct(x, noise)
        assert_f32_close(steps(x, noise), reference, RTOL_REFORMULATION)
        assert_f32_close(steps.forward_unpadded(x, noise), reference, RTOL_REFORMULATION)
        # one step from z_T: the next z_t's pad row (held at zero by the noise term)
        x_p = torch.cat([x, x.new_zeros(3, 1, x.shape[2])], dim=1)
        cond = torch.matmul(steps.pim_z(x_p), steps.w_x) + steps.b_x
        skip_x = torch.matmul(x_p, steps.skip_x) + steps.skip_xb
        zt = torch.cat([noise[:1], noise.new_zeros(1, 1, noise.shape[2])], dim=1)
        t = steps.steps - 1
        h = steps._unet_p(zt, cond, skip_x, t)
        z_next = torch.matmul(h, steps.out_w[t]) + steps.c0_bout_pad[t]
        # zero up to the rounding of the terms that cancel there (z_next's magnitude)
        assert_f32_close(z_next[:, -1], torch.zeros_like(z_next[:, -1]), scale=z_next)


def test_residual_biases_are_folded_forward() -> None:
    """The residual 1x1 convs' biases live in the consumers' per-position biases: the plain
    layout's U-Net (``_unet``) differs from the true hidden layer by the last block's offset,
    which is what ``out_b_last_pos`` adds over ``out_b_last``."""
    model = _model(seed=6)
    steps = FastTower(model).steps
    for spec in [*steps.down_blocks, *steps.up_blocks]:
        assert spec.b1_pos.shape == (spec.c2.shape[1], spec.c_out)  # per position
        assert spec.b1p.shape == (spec.c2.shape[1] + 1, spec.c_out)  # and its pad row
    offset = steps.out_b_last_pos - steps.out_b_last
    assert offset.abs().max() > 1e-3  # the perturbed biases do reach the output


def test_fast_export_runs_no_pad_per_step(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from model.export import export_onnx

    model = _model(seed=7, diffusion_steps=6)
    export_onnx(model, tmp_path / "fast.onnx", model.config.max_seq_len)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fast.onnx")).graph.node]
    assert "Pad" not in ops  # the pad rows are appended once per request (Concat)
