"""The one contract every model of the harness follows (as RecBole's models do).

The trainer calls ``loss``; the evaluator calls ``full_sort_scores``; the exporter calls
``export_module``.  None of them special-cases a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Batch:
    """Left-padded windows (newest last); ``target`` tokens are the next item."""

    item_seq: torch.Tensor  # [B, L] int64, 0 = padding
    time_lag: torch.Tensor  # [B, L] float32 seconds between target time and each behaviour
    target: torch.Tensor | None = None  # [B] int64
    # [B] int64 flat positions of the targets (training batches only): lets a model look up
    # what it prepared for these windows in ``prepare_epoch``.
    positions: torch.Tensor | None = None


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
        self.negatives = 0  # 0: full softmax in ``softmax_loss``
        # log Q(i) of the sampled softmax's proposal over item tokens (row 0 = padding).
        self.register_buffer("sample_log_q", torch.zeros(n_items + 1), persistent=False)

    def use_sampled_softmax(
        self, negatives: int, popularity: np.ndarray | None = None, alpha: float = 0.75
    ) -> None:
        """Train with a sampled softmax of ``negatives`` items drawn from
        ``Q(i) ~ (count_i + 1) ** alpha`` (uniform without ``popularity``), shared by the
        batch, with the log-Q correction: the corpus does not fit a full softmax.

        The proposal favours popular items (the hard negatives of a skewed corpus); the
        correction subtracts ``log(negatives * Q(i))`` from every candidate's logit, so
        the loss stays a consistent estimate of the full softmax (Bengio & Senecal 2008;
        Yi et al., RecSys 2019), as TensorFlow's ``sampled_softmax_loss`` does.
        """
        if negatives < 0:
            raise ValueError("negatives must be >= 0")
        self.negatives = negatives
        weights = torch.ones(self.n_items + 1, dtype=torch.float64)
        if popularity is not None:
            counts = torch.as_tensor(np.asarray(popularity, dtype=np.float64))
            if counts.shape != weights.shape:
                raise ValueError(f"popularity has {counts.shape[0]} rows, not {self.n_items + 1}")
            weights = (counts.clamp(min=0) + 1.0) ** alpha
        weights[0] = 0.0  # padding is never sampled
        log_q = torch.log(weights / weights.sum()).float()
        self.sample_log_q.copy_(log_q.to(self.sample_log_q.device))

    # False: an epoch visits every training position once, each as the last of its own
    # window (one target per window).  True: the loss has a target at every position of
    # the window (the next item; the window's target at the newest), so an epoch visits one
    # window per user, ending at ``dense_cut``: "newest", the user's newest training
    # position (the same (prefix, next item) pairs as the sliding windows in one pass per
    # user, as SASRec's own recipe and SASRec+/gSASRec do), or "random", a position drawn
    # uniformly per user and epoch (a model with a head on the window's end only, which
    # would otherwise see the same (window, target) pair every epoch and learn it by heart).
    dense_loss: bool = False
    dense_cut: str = "newest"

    def use_dense_loss(self, dense_loss: bool, dense_cut: str = "newest") -> None:
        """Turn the every-position loss on or off (``dense_cut``: "newest" or "random")."""
        if dense_cut not in ("newest", "random"):
            raise ValueError(f"dense_cut is 'newest' or 'random', not {dense_cut!r}")
        self.dense_loss, self.dense_cut = dense_loss, dense_cut

    def training_targets(
        self, train_targets: np.ndarray, train_users: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """The target positions one epoch visits (``train_targets`` are grouped by user,
        oldest first, as ``data.leave_one_out`` makes them)."""
        if not self.dense_loss or len(train_targets) == 0:
            return train_targets
        first = np.flatnonzero(np.append(True, train_users[1:] != train_users[:-1]))
        counts = np.diff(np.append(first, len(train_targets)))
        if self.dense_cut == "random":
            return train_targets[first + (rng.random(len(first)) * counts).astype(np.int64)]
        return train_targets[first + counts - 1]

    def prepare_epoch(
        self, make_batch: Callable[[torch.Tensor], Batch], targets: torch.Tensor
    ) -> None:
        """Called by the trainer before each epoch with the target positions it will visit
        and how to build their windows; a model may precompute what its loss reads (the
        default does nothing)."""

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

    def dense_softmax_loss(
        self, hidden: torch.Tensor, item_seq: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """``softmax_loss`` of every window position's output ``hidden`` [B, L, d] against
        its next item; positions that hold padding are left out."""
        return self.softmax_loss(*dense_rows(hidden, item_seq, target))

    def softmax_loss(self, user: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next item: over the whole corpus (padding excluded), or the
        sampled softmax of :meth:`use_sampled_softmax` when it is on."""
        items = self.item_embeddings()
        if self.negatives <= 0:
            logits = user @ items.T
            logits[:, 0] = torch.finfo(logits.dtype).min
            return nn.functional.cross_entropy(logits.float(), target)
        log_q = self.sample_log_q
        sampled = torch.multinomial(log_q.exp(), self.negatives, replacement=True)
        # Importance weights: (1/N) sum_j exp(s_j) / Q(j) estimates the other items' share of
        # the partition function, so each negative's logit loses log(N Q(j)); the positive
        # keeps its exact logit, and a negative that is the target is masked (it is counted
        # exactly already).
        positive = (user * items[target]).sum(1, keepdim=True)
        negative = user @ items[sampled].T - (log_q[sampled] + math.log(self.negatives))[None, :]
        negative = negative.masked_fill(sampled[None, :] == target[:, None], -1e9)
        logits = torch.cat([positive, negative], dim=1).float()
        return nn.functional.cross_entropy(logits, torch.zeros_like(target))


def dense_targets(item_seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, L]: the next item of every window position (the window's target at the newest)."""
    return torch.cat([item_seq[:, 1:], target[:, None]], dim=1)


def dense_rows(
    hidden: torch.Tensor, item_seq: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [N, d], next items [N]) of the window positions that hold a behaviour."""
    following = dense_targets(item_seq, target)
    valid = (item_seq > 0) & (following > 0)
    return hidden[valid], following[valid]


class ExportedTower(nn.Module):
    """``forward(item_seq, time_lag, noise) -> user_embedding``: the ONNX contract."""

    def __init__(self, model: SequentialRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, item_seq: torch.Tensor, time_lag: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        return self.model.user_embedding(Batch(item_seq, time_lag), noise)
