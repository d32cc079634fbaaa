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

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from model.base import (
    Batch,
    SequentialRecommender,
    dense_rows,
    dense_targets,
    keep_contract_inputs,
)
from model.baselines import CausalBlock
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
    # "session": the paper's mixed attention (the last ``session_len`` behaviours plus
    # xhat through one self-attention block, mean-pooled; DIN over the older ones).
    # "causal": a causal transformer over the whole window with learned positions (the
    # SASRec encoder), xhat appended as the newest token, whose output is h_s; DIN of h_s
    # over the whole window with the time-lag feature; e_u = h_s + FFN([h_l, h_s]).
    encoder: str = "session"
    # > 0: the diffusion module reads only the newest ``diffusion_len`` behaviours of the
    # window (its reverse process costs T U-Net passes over them); 0: the whole window.
    diffusion_len: int = 0
    blocks: int = 2  # causal transformer blocks ("causal" encoder)
    # False ("causal" encoder): e_u is the encoder's newest output alone (no target
    # attention over the window, no user FFN): the SASRec read-out.
    user_head: bool = True
    # True ("causal" encoder only): the encoder's output after every window position is
    # also trained on that position's next item (base.dense_loss), as SASRec is.
    dense_loss: bool = False
    dense_cut: str = "newest"  # where each user's window ends (base.dense_cut)
    # "one_step": the tower sees xhat from the training step's own U-Net pass at step r
    # (the paper's Algorithm 1; see ``tower_xhat_min_step_frac``).  "reverse": the tower
    # sees what serving feeds it, the T reverse steps from pure noise (gradient-free).
    tower_xhat: str = "one_step"
    # > 0: a softmax loss on the one-step xhat itself against the (detached) item table,
    # weighted so: the U-Net learns to make xhat a good next-item query, not only a
    # reconstruction of the drift.  The tower loss still never reaches the U-Net.
    xhat_softmax_weight: float = 0.0
    # "all": L_KL over every window position (the paper); "last": only the newest, the one
    # position whose target is not in the condition X.
    kl_positions: str = "all"
    # > 0 ("causal" encoder, dense loss): in training, besides the xhat token after the
    # window, K more xhat tokens at random cut points c of the window, each reconstructed
    # by the diffusion from the behaviours up to c and predicting behaviour c + 1.  The
    # served path (the xhat token's output) is then trained on K + 1 predictions per
    # window rather than one of the ~L rows of the every-position loss, and L_KL sees K + 1
    # windows per user.  Serving is unchanged (one token after the window).
    xhat_cuts: int = 0

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
        if config.encoder not in ("session", "causal"):
            raise ValueError("t2diff's encoder is 'session' or 'causal'")
        if config.tower_xhat not in ("one_step", "reverse"):
            raise ValueError("t2diff's tower_xhat is 'one_step' or 'reverse'")
        if config.kl_positions not in ("all", "last"):
            raise ValueError("t2diff's kl_positions is 'all' or 'last'")
        if config.diffusion_len < 0:
            raise ValueError("t2diff needs diffusion_len >= 0 (0 = the whole window)")
        if config.dense_loss and config.encoder != "causal":
            raise ValueError("t2diff's dense_loss needs encoder='causal'")
        if config.xhat_cuts < 0:
            raise ValueError("t2diff needs xhat_cuts >= 0")
        if config.xhat_cuts > 0 and not (config.dense_loss and config.use_diffusion):
            raise ValueError("t2diff's xhat_cuts needs dense_loss and use_diffusion")
        self.config = config
        self.use_dense_loss(config.dense_loss, config.dense_cut)
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
        if config.encoder == "causal":
            # positions 0..L-1 for the window, L for the xhat token
            self.causal_pos = nn.Embedding(config.max_seq_len + 1, d)
            nn.init.normal_(self.causal_pos.weight, std=0.05)
            self.causal_blocks = nn.ModuleList(
                CausalBlock(d, config.heads, 1, config.dropout) for _ in range(config.blocks)
            )
            self.causal_norm = nn.LayerNorm(d)
            # Target attention of every position over the behaviours up to it, with the
            # time-lag feature as a learned bias of the score (DIN's MLP unit on every
            # (position, behaviour) pair would need [B, L, L, 4d] activations).
            self.target_query = nn.Linear(d, d)
            self.target_key = nn.Linear(d, d)
            self.lag_bias = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 1))
        else:
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
        return (self.config.diffusion_steps, self.diffusion_length, self.config.dim)

    @property
    def diffusion_length(self) -> int:
        """How many of the window's newest behaviours the diffusion module reads."""
        cfg = self.config
        return min(cfg.diffusion_len, cfg.max_seq_len) if cfg.diffusion_len > 0 else cfg.max_seq_len

    def diffusion_window(self, x: torch.Tensor) -> torch.Tensor:
        """The newest ``diffusion_length`` positions of ``x`` [B, L, ...] (all when shorter)."""
        keep = min(self.diffusion_length, x.shape[1])
        return x[:, x.shape[1] - keep :]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.target is not None
        x = self.item_emb(batch.item_seq)
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        cuts = None
        if cfg.use_diffusion and cfg.xhat_cuts > 0:
            cuts, cut_batch = self._draw_cuts(batch)
            x_next, diffusion_loss, xhat_loss = self._diffusion_train(
                cut_batch, self.item_emb(cut_batch.item_seq)
            )
            x_next = x_next.reshape(*cuts.shape, -1)
        elif cfg.use_diffusion:
            x_next, diffusion_loss, xhat_loss = self._diffusion_train(batch, x)
        else:
            x_next, diffusion_loss, xhat_loss = None, x.new_zeros(()), x.new_zeros(())
        if cfg.use_diffusion and cfg.xhat_softmax_weight > 0:
            parts["xhat"] = xhat_loss.detach()
        user, per_position = self._encode(batch, x, x_next, cuts)
        if per_position is None:
            tower_loss = self.softmax_loss(user, batch.target)
        else:
            # The same head after each window position, on its next item, and the xhat
            # token's answer as one more prediction of the window's target: one mean over
            # all of them.  (A separate mean over the batch's window ends would weigh each
            # user's one end-of-window pair ~L times a position, and that pair is the same
            # every epoch: it was learnt by heart, short-history valid NDCG@10 0.08 against
            # SASRec's 0.12.)
            rows, targets = dense_rows(per_position, batch.item_seq, batch.target)
            if cuts is not None:
                valid = cuts >= 0
                rows = torch.cat([rows, user[valid]], dim=0)
                targets = torch.cat([targets, cut_batch.target.reshape(cuts.shape)[valid]], 0)
            elif x_next is not None:
                rows = torch.cat([rows, user], dim=0)
                targets = torch.cat([targets, batch.target], dim=0)
            tower_loss = self.softmax_loss(rows, targets)
        total = (
            tower_loss + cfg.diffusion_weight * diffusion_loss + cfg.xhat_softmax_weight * xhat_loss
        )
        return total, {"tower": tower_loss.detach(), "diffusion": diffusion_loss.detach(), **parts}

    # What the diffusion contributes (issue 16), for evaluation only: "only" serves xhat
    # itself as the query, "zero" feeds the tower a zero xhat; "none" is the model.
    xhat_probe: str = "none"

    def user_embedding(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.item_emb(batch.item_seq)
        x_next = self.reconstruct(x, noise) if self.config.use_diffusion else None
        if x_next is not None and self.xhat_probe == "only":
            return keep_contract_inputs(x_next, batch, noise)
        if x_next is not None and self.xhat_probe == "zero":
            x_next = torch.zeros_like(x_next)
        return keep_contract_inputs(self._tower(batch, x, x_next), batch, noise)

    # ------------------------------------------------------------------ diffusion

    def _draw_cuts(self, batch: Batch) -> tuple[torch.Tensor, Batch]:
        """``xhat_cuts`` random cut points per window among the positions that hold a
        behaviour with a next one, then the window's end: (cuts [B, K + 1], -1 where a
        window has none; the diffusion's windows ending at each cut, newest
        ``diffusion_length`` behaviours, with the next behaviour as target [B (K + 1)])."""
        assert batch.target is not None
        item_seq = batch.item_seq
        batch_size, length = item_seq.shape
        following = dense_targets(item_seq, batch.target)
        inner = ((item_seq > 0) & (following > 0))[:, : length - 1].float()
        has_inner = inner.sum(1, keepdim=True) > 0
        weights = torch.where(has_inner, inner, torch.ones_like(inner))
        drawn = torch.multinomial(weights, self.config.xhat_cuts, replacement=True)
        drawn = torch.where(has_inner, drawn, torch.full_like(drawn, -1))
        end = torch.full((batch_size, 1), length - 1, dtype=drawn.dtype, device=drawn.device)
        cuts = torch.cat([drawn, end], dim=1)
        span = min(self.diffusion_length, length)
        index = cuts[:, :, None] - (span - 1) + torch.arange(span, device=cuts.device)
        inside = (index >= 0) & (cuts[:, :, None] >= 0)
        gathered = torch.gather(
            item_seq[:, None, :].expand(-1, cuts.shape[1], -1), 2, index.clamp(min=0)
        )
        windows = torch.where(inside, gathered, torch.zeros_like(gathered))
        targets = torch.gather(following, 1, cuts.clamp(min=0))
        targets = torch.where(cuts >= 0, targets, torch.zeros_like(targets))
        cut_batch = Batch(
            item_seq=windows.reshape(-1, span),
            time_lag=torch.zeros(windows.shape[0] * windows.shape[1], span, device=cuts.device),
            target=targets.reshape(-1),
        )
        return cuts, cut_batch

    def _diffusion_train(
        self, batch: Batch, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1: one random step r per row; returns (xhat_{n+1} for the tower, L_KL,
        the softmax loss of the one-step xhat, 0 unless ``xhat_softmax_weight``)."""
        target = batch.target
        assert target is not None
        cfg = self.config
        item_seq = self.diffusion_window(batch.item_seq)
        # Stop-gradient: the diffusion module sees frozen embeddings.
        x_in = self.diffusion_window(x.detach())
        target_emb = self.item_emb(target).detach()
        x_full = torch.cat([x_in, target_emb[:, None, :]], dim=1)  # X_{1:n+1}
        z0 = x_full[:, 1:] - x_full[:, :-1] if self.config.drift else x_full[:, 1:]
        t = torch.randint(0, self.schedule.steps, (x.shape[0],), device=x.device)
        zt = self.schedule.add_noise(z0, torch.randn_like(z0), t)
        cond = self.unet.condition(x_in)
        z0_hat = self.unet(zt, cond, x_in, self.unet.step_features(t))
        # Positions whose left element is padding carry no drift (their X is zero).
        valid = (item_seq > 0).to(z0.dtype)
        if cfg.kl_positions == "last":
            valid = torch.zeros_like(valid)
            valid[:, valid.shape[1] - 1] = 1.0
        per_position = (z0_hat - z0).pow(2).sum(-1)
        diffusion_loss = (per_position * valid).sum() / valid.sum().clamp(min=1.0)
        xhat_loss = diffusion_loss.new_zeros(())
        if cfg.xhat_softmax_weight > 0:
            # The one-step xhat as a query over the frozen item table: gradients reach the
            # U-Net only (stop-gradient on the table, as on every input of the module).
            query = self._utilise(z0_hat, x_in)
            logits = query @ self.item_emb.weight.detach().T
            logits[:, 0] = torch.finfo(logits.dtype).min
            xhat_loss = nn.functional.cross_entropy(logits.float(), target)
        if cfg.tower_xhat == "reverse":
            return self._served_xhat(batch, x_in), diffusion_loss, xhat_loss
        frac = self.config.tower_xhat_min_step_frac
        if frac > 0:
            steps = self.schedule.steps
            with torch.no_grad():
                low = min(int(frac * steps), steps - 1)
                t_tower = torch.randint(low, steps, (x.shape[0],), device=x.device)
                zt_tower = self.schedule.add_noise(z0, torch.randn_like(z0), t_tower)
                z0_hat = self.unet(zt_tower, cond, x_in, self.unet.step_features(t_tower))
        return self._utilise(z0_hat, x_in).detach(), diffusion_loss, xhat_loss

    @torch.no_grad()
    def prepare_epoch(
        self, make_batch: Callable[[torch.Tensor], Batch], targets: torch.Tensor
    ) -> None:
        """With ``tower_xhat="reverse"``: the served xhat (T reverse steps from one noise
        draw of this epoch) of every window the epoch visits, computed in large batches now
        rather than per training step (eager T-step loops are bound by kernel launches);
        the U-Net moves little within an epoch."""
        self._epoch_xhat = None
        # With xhat_cuts the tower's xhat comes from windows ending at each step's random
        # cuts, which no per-epoch table holds: preparing the window ends would be wasted.
        cfg = self.config
        if not (cfg.use_diffusion and cfg.tower_xhat == "reverse") or cfg.xhat_cuts > 0:
            return
        positions = torch.sort(targets).values
        noise = torch.randn(self.noise_shape, device=positions.device)
        was_training = self.training
        self.eval()
        rows = [
            self.reconstruct(self.item_emb(make_batch(chunk).item_seq), noise)
            for chunk in positions.split(2048)
        ]
        self.train(was_training)
        self._epoch_xhat = (positions, torch.cat(rows))

    def _served_xhat(self, batch: Batch, x_in: torch.Tensor) -> torch.Tensor:
        """What serving feeds the tower for ``batch``: from ``prepare_epoch`` when it holds
        these windows, else the T reverse steps now (gradient-free, dropout off)."""
        prepared = getattr(self, "_epoch_xhat", None)
        if prepared is not None and batch.positions is not None:
            positions, xhat = prepared
            index = torch.searchsorted(positions, batch.positions).clamp(max=len(positions) - 1)
            if bool((positions[index] == batch.positions).all()):
                return xhat[index].to(x_in.dtype)
        with torch.no_grad():
            was_training = self.unet.training
            self.unet.eval()
            x_next = self.reconstruct(x_in)
            self.unet.train(was_training)
        return x_next

    def _utilise(self, z0_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 18: the last position of ``zhat_0 + X`` (or of ``zhat_0`` without drift)."""
        return (z0_hat[:, -1] + x[:, -1]) if self.config.drift else z0_hat[:, -1]

    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 2: T reverse steps from ``noise[0]``; step noises ``noise[1:]``."""
        steps = self.schedule.steps
        if noise is None:
            noise = torch.randn(self.noise_shape, device=x.device, dtype=x.dtype)
        x = self.diffusion_window(x.detach())
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
        """The mixed-attention half: ``e_u`` from the window ``x`` and ``xhat_{n+1}``."""
        return self._encode(batch, x, x_next)[0]

    def _encode(
        self,
        batch: Batch,
        x: torch.Tensor,
        x_next: torch.Tensor | None,
        cuts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``e_u`` [B, d] ([B, K, d] with ``cuts``), the user vector after each window
        position [B, L, d] in dense training of the causal encoder, else None)."""
        if self.config.encoder == "causal":
            return self._causal_tower(batch, x, x_next, cuts)
        return self._session_tower(batch, x, x_next), None

    def _din(
        self, h_s: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, lag: torch.Tensor
    ) -> torch.Tensor:
        """DIN target attention of ``h_s`` over ``history`` with the time-lag feature."""
        lag = torch.log1p(lag.clamp(min=0))[..., None]
        query = h_s[:, None, :].expand_as(history)
        features = torch.cat(
            [history, history - query, history * query, query, self.lag_proj(lag / 10.0)], dim=2
        )
        scores = self.din(features).squeeze(2)
        scores = scores + (~mask).to(scores.dtype) * NEG_INF
        attn = scores.softmax(dim=1) * mask.to(scores.dtype)
        return (attn[..., None] * history).sum(1)

    def _target_attention(
        self, query: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor, lag: torch.Tensor
    ) -> torch.Tensor:
        """[B, Q, d]: each query's attention over the behaviours ``x`` [B, L, d] it may see
        (``allowed`` [B, Q, L]), the lag (seconds before the query's target time, [B, Q, L])
        adding a learned bias to each score."""
        scores = self.target_query(query) @ self.target_key(x).transpose(1, 2)
        scores = scores * (1.0 / self.config.dim**0.5)
        lag = torch.log1p(lag.clamp(min=0))[..., None] / 10.0
        scores = scores + self.lag_bias(lag).squeeze(3)
        scores = scores + (~allowed).to(scores.dtype) * NEG_INF
        # a query that may see nothing gets zeros (a uniform softmax, masked out)
        attn = scores.softmax(dim=2) * allowed.to(scores.dtype)
        return attn @ x

    def _user_head(self, h_s: torch.Tensor, h_l: torch.Tensor) -> torch.Tensor:
        if not self.config.user_head:
            return h_s
        return h_s + self.user_ffn(torch.cat([h_l, h_s], dim=2))

    def _causal_tower(
        self,
        batch: Batch,
        x: torch.Tensor,
        x_next: torch.Tensor | None,
        cuts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``e_u`` [B, d], and in dense training the same head after every window position
        [B, L, d], else None).  Every parameter but the xhat token's position is shared by
        all positions, so the end of the window has nothing of its own to learn by heart.

        With ``cuts`` [B, K] (training with ``xhat_cuts``), ``x_next`` is [B, K, d]: one
        xhat token per cut c, standing in for behaviour c + 1 (its position), seeing the
        behaviours up to c and itself; no behaviour sees a token.  ``e_u`` is then the
        tokens' outputs [B, K, d].  Without ``cuts`` there is one token after the window,
        as served."""
        cfg = self.config
        item_mask = batch.item_seq > 0
        batch_size, length = item_mask.shape
        # Right-aligned positions: the newest behaviour always gets position max_len - 1.
        start = cfg.max_seq_len - length
        seq = x + self.causal_pos.weight[start : cfg.max_seq_len]
        if cuts is None:
            mask = item_mask
            if x_next is not None:
                token = x_next + self.causal_pos.weight[cfg.max_seq_len]
                seq = torch.cat([seq, token[:, None, :]], dim=1)
                mask = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
            steps = torch.arange(seq.shape[1], device=seq.device)
            causal = steps[None, :] <= steps[:, None]
            allowed = causal[None, :, :] & mask[:, None, :]
            token_sees = item_mask[:, None, :]
        else:
            assert x_next is not None
            seq, mask, allowed, token_sees = self._cut_tokens(seq, item_mask, x_next, cuts)
        keep = mask[:, :, None].to(seq.dtype)
        seq = self.input_drop(seq) * keep
        blocked = (~allowed).to(seq.dtype)[:, None, :, :] * NEG_INF
        for block in self.causal_blocks:
            seq = block(seq, blocked) * keep
        hidden = self.causal_norm(seq)
        if cuts is None:
            # The newest output (the xhat token's, or the newest behaviour's) over the
            # window, its lags measured from the target's time.
            total = seq.shape[1]
            h_s = hidden[:, total - 1 : total]
            h_l = self._target_attention(h_s, x, token_sees, batch.time_lag[:, None, :])
            user = self._user_head(h_s, h_l)[:, 0]
        else:
            h_s = hidden[:, length:]
            cut_lag = torch.gather(self._next_lag(batch.time_lag), 1, cuts.clamp(min=0))
            lags = batch.time_lag[:, None, :] - cut_lag[:, :, None]
            user = self._user_head(h_s, self._target_attention(h_s, x, token_sees, lags))
        if not (self.training and self.dense_loss):
            return user, None
        # Position t predicts behaviour t + 1: its lags are measured from that behaviour's
        # time (time_lag is measured from the window's target, which follows position L-1).
        lags = batch.time_lag[:, None, :] - self._next_lag(batch.time_lag)[:, :, None]
        seen = allowed[:, :length, :length] & item_mask[:, None, :]
        h_t = hidden[:, :length]
        dense = self._user_head(h_t, self._target_attention(h_t, x, seen, lags))
        return user, dense

    def _cut_tokens(
        self, seq: torch.Tensor, item_mask: torch.Tensor, x_next: torch.Tensor, cuts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window ``seq`` [B, L, d] followed by one xhat token per cut (``x_next``
        [B, K, d], ``cuts`` [B, K], -1 = none): (sequence [B, L+K, d], its mask, who may
        attend to whom [B, L+K, L+K], what each token's target attention sees [B, K, L])."""
        batch_size, length = item_mask.shape
        start = self.config.max_seq_len - length
        steps = torch.arange(length, device=seq.device)
        tokens = x_next + self.causal_pos.weight[start + cuts.clamp(min=0) + 1]
        token_mask = cuts >= 0
        token_sees = (steps[None, None, :] <= cuts[:, :, None]) & item_mask[:, None, :]
        n_tokens = cuts.shape[1]
        own = torch.eye(n_tokens, dtype=torch.bool, device=seq.device)[None] & token_mask[:, None]
        items_see = (steps[None, :] <= steps[:, None])[None] & item_mask[:, None, :]
        allowed = torch.cat(
            [
                torch.cat([items_see, own.new_zeros(batch_size, length, n_tokens)], dim=2),
                torch.cat([token_sees, own], dim=2),
            ],
            dim=1,
        )
        mask = torch.cat([item_mask, token_mask], dim=1)
        return torch.cat([seq, tokens], dim=1), mask, allowed, token_sees

    @staticmethod
    def _next_lag(time_lag: torch.Tensor) -> torch.Tensor:
        """[B, L]: the time lag of the behaviour after each position (0 after the newest:
        the window's target, from which lags are measured)."""
        return torch.cat([time_lag[:, 1:], time_lag.new_zeros(time_lag.shape[0], 1)], 1)

    def _session_tower(
        self, batch: Batch, x: torch.Tensor, x_next: torch.Tensor | None
    ) -> torch.Tensor:
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
        h_l = self._din(h_s, history, history_mask, history_lag)
        return self.user_ffn(torch.cat([h_l, h_s], dim=1))


def unet_step(model: T2Diff, zt: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """One approximator call at step ``t`` (for tests and benchmarks)."""
    step = model.unet.step_features(torch.tensor([t], device=x.device))
    return model.unet(zt, model.unet.condition(x), x, step)
