"""The T2Diff user tower (Wang et al., WWW '25) and its item tower.

Structure (paper section 4, ``../shared/papers/NOTES.md``; choices the paper leaves open
are listed in ``docs/model.md``):

* diffusion module: drift ``z_0 = X_{2:n+1} - X_{1:n}``, exponential beta schedule,
  a 1-D U-Net predicting ``zhat_0`` from ``[z_r, X]``, loss ``||z_0 - zhat_0||^2``;
  reconstructed next item ``xhat_{n+1} = (zhat_0 + X)[-1]``; inputs and output of the
  diffusion module are detached (stop-gradient), so the tower loss never reaches it;
* mixed attention: self-attention over the session (last ``session_len`` behaviours plus
  ``xhat_{n+1}``), mean pooled to ``h_s``; DIN target attention of ``h_s`` over the older
  behaviours with a time-lag feature, giving ``h_l``; ``e_u = FFN([h_l, h_s])``;
* item tower: the item-id embedding table (``e_i``), shared with the user tower's inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from model.base import Batch, SequentialRecommender, keep_contract_inputs
from model.schedule import NoiseSchedule
from model.unet import UNet1D

NEG_INF = -1e9


@dataclass
class T2DiffConfig:
    dim: int = 64
    max_seq_len: int = 50
    session_len: int = 10
    # > 0: the session is the newest behaviours up to the first time gap longer than this
    # (seconds), at most ``session_len`` of them; older window positions join the history.
    # 0: the session is the last ``session_len`` behaviours (data without real times).
    session_gap_s: float = 0.0
    unet_width: int = 32
    unet_levels: int = 3
    diffusion_steps: int = 50
    schedule: str = "exponential"
    schedule_a: float = 1e-2
    schedule_b: float = 4.5
    sigma_mode: str = "std"
    diffusion_weight: float = 0.1  # lambda
    heads: int = 2
    dropout: float = 0.1
    use_diffusion: bool = True  # False: the "mixed attention only" ablation
    drift: bool = True  # False: the "W/O DP" ablation (diffuse X_{2:n+1} itself)
    # 0: in training the tower sees xhat_{n+1} from the same random step r as L_KL (the
    # paper).  At small r, z_r still holds the target's drift, so that xhat is nearly the
    # target itself, while serving's xhat comes from 50 steps started at pure noise.
    # f in (0, 1): the tower's xhat comes from a second, gradient-free U-Net pass at
    # r ~ U[floor(f T), T), closer to what serving feeds it.  L_KL is unchanged.
    tower_xhat_min_step_frac: float = 0.0
    # 0: full softmax over the corpus (ML-1M fits); N: a sampled softmax with N negatives
    # drawn by popularity ** 0.75 and the log-Q correction, for corpora that do not fit.
    negatives: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention + FFN, written out so ONNX export is plain ops."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        # A Python number, not one traced from ``x.shape``: the traced scale became a ``Pow``
        # that ONNX Runtime's CUDA EP ran on the CPU, and the copy back to the GPU after it
        # made ORT refuse CUDA-graph capture (docs/results/inference.md, "GPU (H100)").
        self.sqrt_head_dim = (dim // heads) ** 0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=2)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, head_dim).transpose(1, 2)

        scores = split(q) @ split(k).transpose(2, 3) / self.sqrt_head_dim
        scores = scores + (~key_mask)[:, None, None, :].to(scores.dtype) * NEG_INF
        attn = self.drop(scores.softmax(dim=3))  # explicit axis: the ONNX tracer mis-numbers -1
        out = (attn @ split(v)).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.drop(self.proj(out))
        return x + self.drop(self.ffn(self.norm2(x)))


# Dimensions below are written as positive numbers on purpose: torch's ONNX tracer
# (torch 2.13, dynamo=False) numbers a negative ``dim`` of cat/softmax/chunk wrongly.


class T2Diff(SequentialRecommender):
    model_name = "t2diff"

    def __init__(
        self, n_items: int, config: T2DiffConfig, popularity: np.ndarray | None = None
    ) -> None:
        """``popularity`` (train counts per token) shapes the sampled softmax's proposal
        when ``config.negatives > 0``; the full softmax ignores it."""
        super().__init__(n_items, config.dim)
        if not 0.0 <= config.tower_xhat_min_step_frac < 1.0:
            raise ValueError("t2diff needs 0 <= tower_xhat_min_step_frac < 1")
        if config.negatives < 0:
            raise ValueError("t2diff needs negatives >= 0 (0 = full softmax)")
        if config.negatives > 0:
            self.use_sampled_softmax(config.negatives, popularity)
        self.config = config
        d = config.dim
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.schedule = NoiseSchedule.create(
            config.schedule,
            config.diffusion_steps,
            config.schedule_a,
            config.schedule_b,
            config.sigma_mode,  # type: ignore[arg-type]
        )
        self.unet = UNet1D(d, config.unet_width, config.unet_levels)
        self.session_pos = nn.Embedding(config.session_len + 1, d)
        self.session_attn = SelfAttentionBlock(d, config.heads, config.dropout)
        self.session_norm = nn.LayerNorm(d)
        self.lag_proj = nn.Linear(1, 8)
        self.din = nn.Sequential(nn.Linear(4 * d + 8, 64), nn.SiLU(), nn.Linear(64, 1))
        self.user_ffn = nn.Sequential(
            nn.Linear(2 * d, 2 * d), nn.SiLU(), nn.Dropout(config.dropout), nn.Linear(2 * d, d)
        )
        self.input_drop = nn.Dropout(config.dropout)

    # ------------------------------------------------------------------ contract

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.config.diffusion_steps, self.config.max_seq_len, self.config.dim)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.target is not None
        x = self.item_emb(batch.item_seq)
        if self.config.use_diffusion:
            x_next, diffusion_loss = self._diffusion_train(batch.item_seq, x, batch.target)
        else:
            x_next, diffusion_loss = None, x.new_zeros(())
        user = self._tower(batch, x, x_next)
        tower_loss = self.softmax_loss(user, batch.target)
        total = tower_loss + self.config.diffusion_weight * diffusion_loss
        return total, {"tower": tower_loss.detach(), "diffusion": diffusion_loss.detach()}

    def user_embedding(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.item_emb(batch.item_seq)
        x_next = self.reconstruct(x, noise) if self.config.use_diffusion else None
        return keep_contract_inputs(self._tower(batch, x, x_next), batch, noise)

    # ------------------------------------------------------------------ diffusion

    def _diffusion_train(
        self, item_seq: torch.Tensor, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1: one random step r per row; returns (xhat_{n+1}, L_KL)."""
        # Stop-gradient: the diffusion module sees frozen embeddings.
        x_in = x.detach()
        target_emb = self.item_emb(target).detach()
        x_full = torch.cat([x_in, target_emb[:, None, :]], dim=1)  # X_{1:n+1}
        z0 = x_full[:, 1:] - x_full[:, :-1] if self.config.drift else x_full[:, 1:]
        t = torch.randint(0, self.schedule.steps, (x.shape[0],), device=x.device)
        zt = self.schedule.add_noise(z0, torch.randn_like(z0), t)
        cond = self.unet.condition(x_in)
        z0_hat = self.unet(zt, cond, x_in, self.unet.step_features(t))
        # Positions whose left element is padding carry no drift (their X is zero).
        valid = (item_seq > 0).to(z0.dtype)
        per_position = (z0_hat - z0).pow(2).sum(-1)
        diffusion_loss = (per_position * valid).sum() / valid.sum().clamp(min=1.0)
        frac = self.config.tower_xhat_min_step_frac
        if frac > 0:
            steps = self.schedule.steps
            with torch.no_grad():
                low = min(int(frac * steps), steps - 1)
                t_tower = torch.randint(low, steps, (x.shape[0],), device=x.device)
                zt_tower = self.schedule.add_noise(z0, torch.randn_like(z0), t_tower)
                z0_hat = self.unet(zt_tower, cond, x_in, self.unet.step_features(t_tower))
        return self._utilise(z0_hat, x_in).detach(), diffusion_loss

    def _utilise(self, z0_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 18: the last position of ``zhat_0 + X`` (or of ``zhat_0`` without drift)."""
        return (z0_hat[:, -1] + x[:, -1]) if self.config.drift else z0_hat[:, -1]

    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 2: T reverse steps from ``noise[0]``; step noises ``noise[1:]``."""
        steps = self.schedule.steps
        if noise is None:
            noise = torch.randn(self.noise_shape, device=x.device, dtype=x.dtype)
        x = x.detach()
        zt = noise[0].expand_as(x)
        cond = self.unet.condition(x)  # computed once, not T times
        step_table = self.unet.step_features(torch.arange(steps, device=x.device))
        z0_hat = zt
        for t in range(steps - 1, -1, -1):
            z0_hat = self.unet(zt, cond, x, step_table[t : t + 1])
            step_noise = noise[steps - t] if t > 0 else None
            zt = self.schedule.step(z0_hat, zt, t, step_noise)
        return self._utilise(z0_hat, x).detach()

    # ------------------------------------------------------------------ mixed attention

    @staticmethod
    def _session_members(time_lag: torch.Tensor, gap_s: float) -> torch.Tensor:
        """[B, L] bool: positions after the newest gap longer than ``gap_s`` (newest last).

        The newest behaviour always belongs (a session is never empty).  ``time_lag`` falls
        from old to new, so the gap after position i is ``lag[i] - lag[i + 1]``.
        """
        gaps = time_lag[:, :-1] - time_lag[:, 1:]
        breaks = torch.cat([gaps > gap_s, gaps.new_zeros(gaps.shape[0], 1, dtype=torch.bool)], 1)
        # A position is cut off when a break lies at or after it: the count of breaks at or
        # after i is total - (cumulative count up to i) + (break at i); no flip, no in-place.
        counts = breaks.to(time_lag.dtype)
        after = counts.sum(1, keepdim=True) - counts.cumsum(1) + counts
        return after == 0

    def _tower(self, batch: Batch, x: torch.Tensor, x_next: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        mask = batch.item_seq > 0
        x = self.input_drop(x)
        # Session: the newest behaviours plus the reconstructed next item.
        session = x[:, -cfg.session_len :]
        session_mask = mask[:, -cfg.session_len :]
        if cfg.session_gap_s > 0:
            member = self._session_members(batch.time_lag, cfg.session_gap_s)
            session_mask = session_mask & member[:, -cfg.session_len :]
            # Window positions cut off by a gap belong to the history, so nothing is lost.
            positions = torch.arange(mask.shape[1], device=mask.device)
            window = (positions >= mask.shape[1] - cfg.session_len)[None, :]
            history, history_mask = x, mask & ~(window & member)
            history_lag = batch.time_lag
        else:
            history = x[:, : -cfg.session_len]
            history_mask = mask[:, : -cfg.session_len]
            history_lag = batch.time_lag[:, : -cfg.session_len]
        if x_next is not None:
            session = torch.cat([session, x_next[:, None, :]], dim=1)
            session_mask = torch.cat([session_mask, session_mask.new_ones(x.shape[0], 1)], 1)
        session = session + self.session_pos.weight[-session.shape[1] :]
        encoded = self.session_attn(session, session_mask)
        weights = session_mask.to(encoded.dtype)[..., None]
        h_s = self.session_norm((encoded * weights).sum(1) / weights.sum(1).clamp(min=1.0))
        # History: DIN target attention with the time-lag feature.
        lag = torch.log1p(history_lag.clamp(min=0))[..., None]
        query = h_s[:, None, :].expand_as(history)
        features = torch.cat(
            [history, history - query, history * query, query, self.lag_proj(lag / 10.0)], dim=2
        )
        scores = self.din(features).squeeze(2)
        scores = scores + (~history_mask).to(scores.dtype) * NEG_INF
        attn = scores.softmax(dim=1) * history_mask.to(scores.dtype)
        h_l = (attn[..., None] * history).sum(1)
        return self.user_ffn(torch.cat([h_l, h_s], dim=1))


def unet_step(model: T2Diff, zt: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """One approximator call at step ``t`` (for tests and benchmarks)."""
    step = model.unet.step_features(torch.tensor([t], device=x.device))
    return model.unet(zt, model.unet.condition(x), x, step)
