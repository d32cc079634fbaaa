"""A tiny batch and noise shared by the model-contract tests (baselines, DimeRec)."""

from __future__ import annotations

from pathlib import Path

import torch
from tolerances import RTOL_REFORMULATION, assert_f32_close

from model.base import Batch, SequentialRecommender
from model.t2diff import T2Diff, T2DiffConfig

N_ITEMS = 30
BATCH = 8
SEQ_LEN = 12


def tiny_batch() -> Batch:
    """Left-padded windows of varied length (one empty, one full); the target is a fixed
    function of the newest item, so every model can fit it."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([SEQ_LEN, 1, 5, 0, 7, SEQ_LEN, 3, 9])
    tokens = torch.randint(1, N_ITEMS + 1, (BATCH, SEQ_LEN), generator=gen)
    valid = torch.arange(SEQ_LEN)[None, :] >= SEQ_LEN - lengths[:, None]
    item_seq = torch.where(valid, tokens, 0)
    time_lag = torch.where(valid, torch.rand(BATCH, SEQ_LEN, generator=gen) * 1e5, 0.0)
    target = (item_seq[:, SEQ_LEN - 1] * 7) % N_ITEMS + 1
    return Batch(item_seq=item_seq, time_lag=time_lag.float(), target=target)


def eval_loss(model: SequentialRecommender, batch: Batch) -> tuple[float, dict[str, float]]:
    """The loss and its parts without dropout and with a fixed draw of any training randomness."""
    model.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        loss, parts = model.loss(batch)
    return float(loss), {k: float(v) for k, v in parts.items()}


def train_steps(model: SequentialRecommender, batch: Batch, steps: int, lr: float = 1e-2) -> None:
    """``steps`` Adam steps on the same batch (in training mode)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def noise_for(model: SequentialRecommender, seed: int = 0) -> torch.Tensor:
    return torch.randn(model.noise_shape, generator=torch.Generator().manual_seed(seed))


def assert_onnx_matches(model: SequentialRecommender, path: Path, seeds: tuple[int, ...]) -> None:
    """Export ``model`` to ``path`` and check ONNX Runtime against eager on the tiny batch
    (batch 8, traced at batch 2: the batch axis is dynamic), for each noise seed."""
    import onnxruntime as ort

    from contracts.tower import INPUT_ITEM_SEQ, INPUT_NOISE, INPUT_TIME_LAG, OUTPUT_USER_EMBEDDING
    from model.export import export_onnx  # torch.onnx.export(dynamo=False, opset 17)

    export_onnx(model, path, SEQ_LEN)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == {INPUT_ITEM_SEQ, INPUT_TIME_LAG, INPUT_NOISE}
    batch = tiny_batch()
    for seed in seeds:
        noise = noise_for(model, seed)
        with torch.no_grad():
            expected = model.eval().user_embedding(batch, noise).numpy()
        (got,) = session.run(
            [OUTPUT_USER_EMBEDDING],
            {
                INPUT_ITEM_SEQ: batch.item_seq.numpy(),
                INPUT_TIME_LAG: batch.time_lag.numpy(),
                INPUT_NOISE: noise.numpy(),
            },
        )
        assert got.shape == expected.shape
        assert_f32_close(got, expected, RTOL_REFORMULATION)


def perturbed_t2diff(tiny: dict[str, object], seed: int = 0, **overrides: object) -> T2Diff:
    """A small T2Diff in eval mode with every parameter moved off its initial value (so
    the parity tests see non-trivial weights: zero-initialised biases, unit norms)."""
    torch.manual_seed(seed)
    model = T2Diff(40, T2DiffConfig(**{**tiny, **overrides})).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def tower_inputs(model: T2Diff, batch: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """``(item_seq, time_lag, noise)`` for ``model``'s tower; row 0 is half padding."""
    gen = torch.Generator().manual_seed(seed)
    length = model.config.max_seq_len
    item_seq = torch.randint(1, model.n_items + 1, (batch, length), generator=gen)
    item_seq[0, : length // 2] = 0  # a short, left-padded history
    time_lag = torch.rand(batch, length, generator=gen) * 1e6
    noise = torch.randn(model.noise_shape, generator=gen)
    return item_seq, time_lag, noise
