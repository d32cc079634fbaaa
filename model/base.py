"""The one contract every model of the harness follows (as RecBole's models do).

The trainer calls ``loss``; the evaluator calls ``full_sort_scores``; the exporter calls
``export_module``.  None of them special-cases a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    """Left-padded windows (newest last); ``target`` tokens are the next item."""

    item_seq: torch.Tensor  # [B, L] int64, 0 = padding
    time_lag: torch.Tensor  # [B, L] float32 seconds between target time and each behaviour
    target: torch.Tensor | None = None  # [B] int64


def keep_contract_inputs(
    user: torch.Tensor, batch: Batch, noise: torch.Tensor | None
) -> torch.Tensor:
    """``user`` plus an exact zero that reads ``time_lag`` and ``noise``.

    Only there so the traced ONNX graph keeps those inputs (the serving contract feeds all
    three); a sum over an empty slice is 0 whatever the values (no ``0 * inf`` NaN).
    """
    user = user + batch.time_lag[:, :0].sum(1, keepdim=True).to(user.dtype)
    if noise is not None:
        user = user + noise.reshape(-1)[:0].sum().to(user.dtype)
    return user


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``loss`` and ``user_embedding``."""

    model_name: str = "base"

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.dim = dim

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and its parts (detached tensors, so logging never syncs the GPU)."""
        raise NotImplementedError

    def user_embedding(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d]; ``noise`` (shape ``noise_shape``) fixes a stochastic model's draw."""
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        """[N + 1, d]; row 0 (padding) is never recommended."""
        raise NotImplementedError

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the noise a request needs (empty for a deterministic model)."""
        return (1,)

    def full_sort_scores(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item token, [B, N + 1]."""
        return self.user_embedding(batch, noise) @ self.item_embeddings().T

    def softmax_loss(self, user: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Full-softmax cross-entropy over the corpus (padding excluded)."""
        logits = user @ self.item_embeddings().T
        logits[:, 0] = torch.finfo(logits.dtype).min
        return nn.functional.cross_entropy(logits.float(), target)


class ExportedTower(nn.Module):
    """``forward(item_seq, time_lag, noise) -> user_embedding``: the ONNX contract."""

    def __init__(self, model: SequentialRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, item_seq: torch.Tensor, time_lag: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        return self.model.user_embedding(Batch(item_seq, time_lag), noise)
