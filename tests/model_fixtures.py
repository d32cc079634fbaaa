"""A tiny batch and noise shared by the model-contract tests (baselines, DimeRec)."""

from __future__ import annotations

import torch

from model.base import Batch, SequentialRecommender

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


def noise_for(model: SequentialRecommender, seed: int = 0) -> torch.Tensor:
    return torch.randn(model.noise_shape, generator=torch.Generator().manual_seed(seed))
