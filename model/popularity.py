"""The popularity baseline: every user gets the most popular training items."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model.base import Batch, SequentialRecommender


class Popularity(SequentialRecommender):
    model_name = "popularity"

    def __init__(self, n_items: int, counts: np.ndarray | None = None) -> None:
        super().__init__(n_items, dim=1)
        counts = np.zeros(n_items + 1) if counts is None else counts
        # A buffer, so the counts travel in the state dict like any other model's weights.
        self.register_buffer(
            "log_counts", torch.log1p(torch.as_tensor(counts, dtype=torch.float32))
        )
        self._dummy = nn.Parameter(torch.zeros(1))  # gives the optimiser something to hold

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zero = self._dummy.sum() * 0.0
        return zero, {"tower": zero.detach()}

    def item_embeddings(self) -> torch.Tensor:
        return self.log_counts[:, None]

    def user_embedding(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(batch.item_seq.shape[0], 1, device=batch.item_seq.device)
