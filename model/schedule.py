"""The diffusion noise schedule: a small object apart from the network (as in diffusers).

``add_noise`` is the DDPM forward closed form, ``step`` one reverse step with the DDPM
posterior.  Indices are 0-based: ``t = 0`` is the first (least noisy) of ``T`` steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleKind = Literal["exponential", "linear", "log", "cosine"]
SigmaMode = Literal["std", "variance", "none"]


def make_betas(kind: ScheduleKind, steps: int, a: float = 1e-2, b: float = 4.5) -> torch.Tensor:
    """Noise levels beta_1..beta_T (float64).

    * ``exponential`` (T2Diff): ``beta_r = a * exp(b * r / T)``, the authors' public code
      (a = 1e-2, b = 4.5: beta runs from ~0.0105 to ~0.90 at any T);
    * ``linear`` (DDPM): from 1e-4 to 0.02 scaled to T = 1000-equivalent noise;
    * ``log``: ``beta_r = a + (beta_max - a) * log(1 + (e-1) r / T)``, rising fast then flat,
      the mirror of the exponential one over the same range (ablation of Table 3);
    * ``cosine``: Nichol & Dhariwal.
    """
    r = torch.arange(1, steps + 1, dtype=torch.float64)
    if kind == "exponential":
        betas = a * torch.exp(b * r / steps)
    elif kind == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64)
    elif kind == "log":
        top = a * math.exp(b)
        betas = a + (top - a) * torch.log1p((math.e - 1.0) * r / steps)
    elif kind == "cosine":
        s = 0.008
        grid = torch.arange(steps + 1, dtype=torch.float64) / steps
        abar = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - abar[1:] / abar[:-1]
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return betas.clamp(1e-6, 0.999)


class NoiseSchedule:
    """DDPM quantities for a beta sequence, stored as float32 tensors on ``device``."""

    def __init__(self, betas: torch.Tensor, sigma_mode: SigmaMode = "std") -> None:
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.steps = len(betas)
        self.sigma_mode: SigmaMode = sigma_mode
        self.betas = betas
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1 - abar).sqrt()
        # Posterior q(z_{t-1} | z_t, z_0) = N(c0 * z_0 + ct * z_t, beta_tilde).
        self.posterior_c0 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_ct = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        beta_tilde = betas * (1 - abar_prev) / (1 - abar)
        # "std" is DDPM's ancestral sampling.  "variance" scales the step noise by beta_tilde
        # itself, as the T2Diff authors' code and DimeRec's Algorithm 2 (line 7) do.  "none"
        # takes the posterior mean only (a deterministic reverse process, as DiffRec serves).
        if sigma_mode not in ("std", "variance", "none"):
            raise ValueError(f"unknown sigma_mode {sigma_mode!r}: std, variance or none")
        if sigma_mode == "none":
            self.sigma = torch.zeros_like(beta_tilde)
        else:
            self.sigma = beta_tilde if sigma_mode == "variance" else beta_tilde.sqrt()

    @classmethod
    def create(
        cls,
        kind: ScheduleKind,
        steps: int,
        a: float = 1e-2,
        b: float = 4.5,
        sigma_mode: SigmaMode = "std",
    ) -> NoiseSchedule:
        return cls(make_betas(kind, steps, a, b), sigma_mode)

    @staticmethod
    def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(device=like.device, dtype=like.dtype)[t]
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, one t per row."""
        return (
            self._gather(self.sqrt_abar, t, z0) * z0
            + self._gather(self.sqrt_one_minus_abar, t, z0) * noise
        )

    def step(
        self, z0_hat: torch.Tensor, zt: torch.Tensor, t: int, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """One reverse step z_t -> z_{t-1} for a scalar step ``t`` (no noise at t = 0)."""
        mean = float(self.posterior_c0[t]) * z0_hat + float(self.posterior_ct[t]) * zt
        if t == 0 or noise is None:
            return mean
        return mean + float(self.sigma[t]) * noise
