"""``model.fused_tower``: the one-kernel reverse process gives eager's answer.

Runs the Triton kernel through Triton's interpreter on the CPU (``TRITON_INTERPRET=1``; on
a machine with CUDA it runs on the GPU).  Skipped, saying why, where triton is absent
(it comes with the dev extra).  The interpreter runs one program after another: it checks
the arithmetic, not races between programs (the GPU benchmark compares every batch size
with eager for that).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernel is decorated (at the import of model.fused_tower).
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install -e .[dev] brings it)"
)
import triton.language as tl  # noqa: E402
from model_fixtures import perturbed_t2diff, tower_inputs  # noqa: E402

from model.base import Batch  # noqa: E402
from model.fast_tower import FastUNetSteps  # noqa: E402
from model.fused_tower import (  # noqa: E402
    FusedTower,
    FusedUNetSteps,
    _round_tf32,
    _round_tf32_host,
)
from model.t2diff import T2Diff  # noqa: E402

TOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel's shapes: 3 levels, channel counts powers of two >= 16; odd lengths (13 -> 7
# -> 4) exercise ceil-mode pooling and the cropped upsampling.
TINY = {"dim": 16, "unet_width": 16, "max_seq_len": 13, "session_len": 4, "diffusion_steps": 3}


@triton.jit
def _round_kernel(src, dst, N: tl.constexpr) -> None:
    offsets = tl.arange(0, N)
    tl.store(dst + offsets, _round_tf32(tl.load(src + offsets)))


def _model(seed: int = 0, **overrides: object) -> T2Diff:
    return perturbed_t2diff(TINY, seed, **overrides)


_inputs = tower_inputs


@pytest.mark.parametrize("samples_per_program", [1, 2])
@pytest.mark.parametrize("overrides", [{}, {"drift": False, "sigma_mode": "variance"}])
def test_fused_steps_match_fast_steps(samples_per_program: int, overrides: dict) -> None:
    model = _model(**overrides)
    fast = FastUNetSteps(model)
    fused = FusedUNetSteps(model, samples_per_program=samples_per_program).to(DEVICE)
    for batch in (1, 3):  # 3 with two samples per program: a half-empty last program
        item_seq, _, noise = _inputs(model, batch)
        with torch.no_grad():
            x = model.item_emb(item_seq)
            expected = fast(x, noise)
            got = fused(x.to(DEVICE), noise.to(DEVICE)).cpu()
        assert got.shape == expected.shape
        assert torch.isfinite(got).all()
        assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("kernel", ["pipelined", "uniform"])
def test_both_kernel_builds_give_the_same_answer(kernel: str) -> None:
    # dim 32 with widths 16/32/64: the parts have different channel counts, so the
    # pipelined build's chunks (16, 32, 32, 32 at a cap of 32) differ from the uniform
    # one's (16), and its prefetching tap x chunk loop runs 3 and 6 rounds.
    model = _model(seed=5, dim=32)
    fast = FastUNetSteps(model)
    fused = FusedUNetSteps(model, k_chunk=32, kernel=kernel).to(DEVICE)
    assert fused.chunks[kernel] == ({16: 16, 32: 16, 64: 16} if kernel == "uniform" else
                                    {16: 16, 32: 32, 64: 32})  # fmt: skip
    item_seq, _, noise = _inputs(model, 2, seed=6)
    with torch.no_grad():
        x = model.item_emb(item_seq)
        expected = fast(x, noise)
        got = fused(x.to(DEVICE), noise.to(DEVICE)).cpu()
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("kernel", ["pipelined", "uniform"])
def test_tf32_with_a_tf32x3_tail(kernel: str) -> None:
    # TINY has 3 steps: a tail of 1 or 2 splits them over the kernel's two loops, a tail of
    # 3 or more runs every step in tf32x3 (float32 parity).  The tf32 steps round their
    # operands to nearest tf32 (the interpreter then multiplies in float32), so a tail moves
    # the answer less than tf32 everywhere; by how much on ML-1M is measured on the GPU.
    model = _model(seed=9)
    fast = FastUNetSteps(model)
    item_seq, _, noise = _inputs(model, 2, seed=10)

    def error(precision: str, exact_tail: int = 5) -> float:
        fused = FusedUNetSteps(model, precision=precision, kernel=kernel, exact_tail=exact_tail)
        with torch.no_grad():
            x = model.item_emb(item_seq)
            got = fused.to(DEVICE)(x.to(DEVICE), noise.to(DEVICE)).cpu()
            return (got - fast(x, noise)).abs().max().item()

    assert FusedUNetSteps(model, precision="tf32x3tail", exact_tail=2).step_precisions == (
        "tf32",
        2,
        "tf32x3",
    )
    assert FusedUNetSteps(model, precision="tf32x3tail", exact_tail=9).step_precisions[1] == 3
    everywhere = error("tf32")
    assert 1e-5 < everywhere < 1e-2  # tf32 rounding, not a wiring error
    for exact_tail in (1, 2):
        assert error("tf32x3tail", exact_tail) < everywhere
    assert error("tf32x3tail", 3) < TOL


def test_tf32_rounding_in_the_kernel_matches_the_host() -> None:
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 10.0
    values[:4] = torch.tensor([0.0, -0.0, 1.0 + 2.0**-11, -(1.0 + 3 * 2.0**-11)])  # ties
    rounded = _round_tf32_host(values)
    assert (rounded.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((rounded - values).abs() <= values.abs() * 2.0**-11).all()
    assert rounded[2].item() == 1.0 + 2.0**-10 and rounded[3].item() == -(1.0 + 2.0**-9)
    out = torch.empty_like(values).to(DEVICE)
    _round_kernel[(1,)](values.to(DEVICE), out, values.numel())
    assert torch.equal(out.cpu(), rounded)


def test_auto_takes_pipelined_only_for_tf32_on_at_most_one_wave_of_4_warp_programs() -> None:
    model = _model()
    auto = FusedUNetSteps(model, precision="tf32")
    assert auto.kernel_for(1, torch.device("cpu")) == "pipelined"
    assert FusedUNetSteps(model).kernel_for(1, torch.device("cpu")) == "uniform"  # ieee
    assert FusedUNetSteps(model, precision="tf32x3").kernel_for(1, torch.device("cpu")) == "uniform"
    tail = FusedUNetSteps(model, precision="tf32x3tail")
    assert tail.kernel_for(1, torch.device("cpu")) == "pipelined"
    eight = FusedUNetSteps(model, precision="tf32", num_warps=8)
    assert eight.kernel_for(1, torch.device("cpu")) == "uniform"
    assert FusedUNetSteps(model, kernel="uniform").kernel_for(1, torch.device("cpu")) == "uniform"
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda = torch.device("cuda", 0)
        assert auto.kernel_for(sms, cuda) == "pipelined"
        assert auto.kernel_for(sms + 1, cuda) == "uniform"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # the causal tower over 17 behaviours, the diffusion over the newest 13
        {"encoder": "causal", "dense_loss": True, "max_seq_len": 17, "diffusion_len": 13},
    ],
)
def test_fused_tower_matches_user_embedding(overrides: dict) -> None:
    model = _model(seed=3, **overrides)
    tower = FusedTower(model).to(DEVICE)
    item_seq, time_lag, noise = _inputs(model, 2, seed=4)
    with torch.no_grad():
        expected = model.user_embedding(Batch(item_seq, time_lag), noise)
        got = tower(item_seq.to(DEVICE), time_lag.to(DEVICE), noise.to(DEVICE)).cpu()
    assert (got - expected).abs().max().item() < TOL


def test_fused_refuses_shapes_it_was_not_written_for() -> None:
    with pytest.raises(ValueError, match="3-level"):
        FusedUNetSteps(_model(unet_levels=2))
    with pytest.raises(ValueError, match="powers of two"):
        FusedUNetSteps(_model(unet_width=24))
    with pytest.raises(ValueError, match="precision"):
        FusedUNetSteps(_model(), precision="fp8")
    with pytest.raises(ValueError, match="k_chunk"):
        FusedUNetSteps(_model(), k_chunk=24)
    with pytest.raises(ValueError, match="kernel"):
        FusedUNetSteps(_model(), kernel="fast")
    with pytest.raises(ValueError, match="exact_tail"):
        FusedUNetSteps(_model(), precision="tf32x3tail", exact_tail=0)
