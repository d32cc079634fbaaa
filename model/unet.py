"""A 1-D U-Net over the sequence axis: the T2Diff approximator ``zhat_0 = UNet([z_t, X])``.

The history ``X`` is the condition, concatenated with ``z_t`` on the channel axis.  The first
convolution is linear in its input, so it is split into a ``z_t`` half and an ``X`` half:
``conv([z_t, X]) = conv_z(z_t) + conv_x(X)``.  ``condition(X)`` computes the ``X`` half once
per request; the 50 reverse steps only run ``forward(z_t, cond, t)``.  Same function, fewer
FLOPs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard transformer/DDPM step embedding of integer steps ``t`` ([B] -> [B, dim])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each position of a [B, C, L] tensor (no mixing along L)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ConvBlock(nn.Module):
    """conv3 -> norm -> SiLU (+ step bias) -> conv3 -> norm -> SiLU, with a residual path."""

    def __init__(self, c_in: int, c_out: int, step_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.norm1 = ChannelNorm(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.norm2 = ChannelNorm(c_out)
        self.step_bias = nn.Linear(step_dim, c_out)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(
        self, x: torch.Tensor, step: torch.Tensor, pre: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.conv1(x) if pre is None else pre
        h = F.silu(self.norm1(h)) + self.step_bias(step)[:, :, None]
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class UNet1D(nn.Module):
    """Encoder widths ``width * 2**level``; average-pool down, nearest up, skip concatenation.

    ``forward`` takes ``z_t`` ([B, L, d]), the precomputed condition from ``condition``
    and the step ``t``; it returns ``zhat_0`` ([B, L, d]).
    """

    def __init__(self, dim: int, width: int = 32, levels: int = 3, step_dim: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.step_dim = step_dim
        self.step_mlp = nn.Sequential(
            nn.Linear(step_dim, step_dim), nn.SiLU(), nn.Linear(step_dim, step_dim)
        )
        widths = [width * 2**level for level in range(levels)]
        # First block: its conv1 on [z_t, X] is split into the z half and the X half.
        self.in_z = nn.Conv1d(dim, widths[0], 3, padding=1, bias=False)
        self.in_x = nn.Conv1d(dim, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down.append(ConvBlock(2 * dim, widths[0], step_dim))
        for level in range(1, levels):
            self.down.append(ConvBlock(widths[level - 1], widths[level], step_dim))
        self.up = nn.ModuleList(
            ConvBlock(widths[level] + widths[level - 1], widths[level - 1], step_dim)
            for level in range(levels - 1, 0, -1)
        )
        self.out = nn.Conv1d(widths[0], dim, 1)

    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """The history's share of the first convolution, [B, L, d] -> [B, width, L]."""
        return self.in_x(x.transpose(1, 2))

    def step_features(self, t: torch.Tensor) -> torch.Tensor:
        return self.step_mlp(sinusoidal_embedding(t, self.step_dim))

    def forward(
        self, zt: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        """``step`` is ``step_features(t)`` ([B or 1, step_dim]); ``x`` the history [B, L, d]."""
        z = zt.transpose(1, 2)
        first_in = torch.cat([z, x.transpose(1, 2)], dim=1)  # only for the residual path
        h = self.down[0](first_in, step, pre=self.in_z(z) + cond)
        skips = [h]
        for block in self.down[1:]:
            h = block(F.avg_pool1d(h, 2, ceil_mode=True), step)
            skips.append(h)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = h.repeat_interleave(2, dim=2)[:, :, : skip.shape[2]]
            h = block(torch.cat([h, skip], dim=1), step)
        return self.out(h).transpose(1, 2)
