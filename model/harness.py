"""Batches built on the device and the full-ranking evaluator, shared by every model.

Training windows are gathered from flat device tensors with index arithmetic: no
per-sample Python in the loop, so an epoch on ML-1M is bound by the model, not by data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.base import Batch, SequentialRecommender
from model.data import SequenceData
from model.metrics import DEFAULT_CUTOFFS, metrics_from_ranks


@dataclass
class DeviceSequences:
    """``SequenceData`` as device tensors plus each flat position's user start."""

    items: torch.Tensor  # [total] int64
    timestamps: torch.Tensor  # [total] float64
    start_of: torch.Tensor  # [total] int64: offsets[user of position]
    n_items: int

    @classmethod
    def from_data(cls, data: SequenceData, device: torch.device | str) -> DeviceSequences:
        start_of = np.repeat(data.offsets[:-1], data.lengths)
        return cls(
            items=torch.as_tensor(np.array(data.items), device=device),
            timestamps=torch.as_tensor(np.array(data.timestamps), device=device),
            start_of=torch.as_tensor(start_of, device=device),
            n_items=data.n_items,
        )

    def batch(self, targets: torch.Tensor, max_len: int) -> Batch:
        """Windows of the ``max_len`` behaviours before each target position (left-padded)."""
        positions = targets[:, None] - max_len + torch.arange(max_len, device=targets.device)
        valid = positions >= self.start_of[targets][:, None]
        safe = positions.clamp(min=0)
        item_seq = torch.where(valid, self.items[safe], 0)
        lag = (self.timestamps[targets][:, None] - self.timestamps[safe]).float()
        time_lag = torch.where(valid, lag, 0.0)
        return Batch(
            item_seq=item_seq, time_lag=time_lag, target=self.items[targets], positions=targets
        )

    def seen_items(self, targets: torch.Tensor) -> torch.Tensor:
        """Every item before each target (not only the window), 0-padded: [B, max prefix]."""
        starts = self.start_of[targets]
        longest = int((targets - starts).max().item()) if len(targets) else 0
        positions = starts[:, None] + torch.arange(max(longest, 1), device=targets.device)
        valid = positions < targets[:, None]
        return torch.where(valid, self.items[positions.clamp(max=len(self.items) - 1)], 0)


@torch.no_grad()
def rank_targets(
    model: SequentialRecommender,
    sequences: DeviceSequences,
    targets: np.ndarray,
    max_len: int,
    exclude_seen: bool = True,
    # Large enough that the T-step reverse process of a diffusion tower runs in few calls
    # (eager PyTorch on a GPU is bound by kernel launches, not by the batch).
    batch_size: int = 2048,
    noise_seed: int = 0,
) -> np.ndarray:
    """0-based rank of each target among all items (ties count against the target)."""
    model.eval()
    device = sequences.items.device
    generator = torch.Generator(device="cpu").manual_seed(noise_seed)
    noise = torch.randn(model.noise_shape, generator=generator).to(device)
    ranks: list[np.ndarray] = []
    all_targets = torch.as_tensor(targets, device=device)
    for start in range(0, len(all_targets), batch_size):
        chunk = all_targets[start : start + batch_size]
        batch = sequences.batch(chunk, max_len)
        scores = model.full_sort_scores(batch, noise).float()
        scores[:, 0] = -torch.inf
        if exclude_seen:
            scores.scatter_(1, sequences.seen_items(chunk), -torch.inf)
        target_scores = scores.gather(1, batch.target[:, None])
        ranks.append((scores > target_scores).sum(1).cpu().numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0)


def evaluate(
    model: SequentialRecommender,
    sequences: DeviceSequences,
    targets: np.ndarray,
    max_len: int,
    exclude_seen: bool = True,
    cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS,
    noise_seed: int = 0,
) -> dict:
    ranks = rank_targets(model, sequences, targets, max_len, exclude_seen, noise_seed=noise_seed)
    return metrics_from_ranks(ranks, cutoffs)
