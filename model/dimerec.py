"""DimeRec (Li et al., Kuaishou): diffusion over multi-interest guidance, and ComiRec-SA.

Structure (paper section 4, ``../shared/papers/dimerec-paper.txt``; choices the paper
leaves open are listed in ``docs/model.md``, section DimeRec):

* item tower: one item-id table; on the unit sphere (rows L2-normalised) unless the
  ``geodesic`` option is off (the "w/o GRW" ablation works in Euclidean space);
* GEM, guidance extraction (ComiRec-SA, eq. 16-17): ``A = softmax_positions(W2 tanh(W1
  (H + P)))``, ``g = A^T H``, K interests; ``L_gem`` (eq. 18-19) is the softmax loss of the
  interest nearest the target;
* DAM, diffusion aggregation (eq. 20-22): an MLP ``xhat_0 = f(x_t, t, g)`` conditioned on
  all K interests; the target's embedding is noised by a geodesic random walk
  ``x_t = exp_{x_0}[sqrt(1 - abar_t) eps]`` (Algorithm 1); ``L_recon = ||x_0 - xhat_0||^2``
  and ``L_ssm``, the softmax loss of ``xhat_0`` against the items;
* ``L = gem_weight L_gem + recon_weight L_recon + ssm_weight L_ssm`` (1, lambda = 0.1, mu);
* serving (Algorithm 2): ``x_T`` from the ``noise`` input, T reverse DDPM steps, each
  re-normalised onto the sphere; the user embedding is the generated ``x_0``.

``use_diffusion=False`` is ComiRec-SA alone (``comirec_sa``): evaluated by the maximum over
the K interests of each item's score, served as the normalised mean of the K unit
interests (the ONNX contract has one vector per user).

Dimensions below are written as positive numbers on purpose: torch's ONNX tracer
(torch 2.13, dynamo=False) numbers a negative ``dim`` of cat/softmax/chunk wrongly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from model.base import Batch, SequentialRecommender, keep_contract_inputs
from model.schedule import NoiseSchedule
from model.unet import sinusoidal_embedding

NEG_INF = -1e9
EMBEDDING_STD = 0.05  # the same item-table init as the other models
NORM_EPS = 1e-12


@dataclass
class DimeRecConfig:
    dim: int = 64
    max_seq_len: int = 50
    interests: int = 4  # K
    attention_mult: int = 4  # W1: d -> attention_mult * d (the paper's MLP([4d, K], tanh))
    dropout: float = 0.1  # on the GEM's input embeddings
    temperature: float = 0.1  # logits = cosine / temperature on the sphere (unused off it)
    negatives: int = 0  # 0: full softmax over the corpus; n: n shared uniform negatives
    use_diffusion: bool = True  # False: ComiRec-SA alone (the "comirec_sa" baseline)
    geodesic: bool = True  # False: the "w/o GRW" ablation (Euclidean space, Gaussian noise)
    diffusion_steps: int = 20  # T (Table 5)
    schedule: str = "cosine"  # the paper says "pre-designed" only; see docs/model.md
    schedule_a: float = 1e-2  # only for the exponential/log schedules of model.schedule
    schedule_b: float = 4.5
    # Algorithm 2, line 7: the step noise is beta_tilde_t * eps' (the variance, not its square
    # root).  With eps ~ N(0, I) in d dims (|eps| ~ 8 for d = 64) the standard deviation
    # ("std") swamps the posterior mean at every step: on ML-1M it cost 0.10 HR@50
    # (docs/results/model-quality.md, run 14).  "none" (posterior mean only) is as good.
    sigma_mode: str = "variance"
    # Multiplies every Gaussian draw (forward walk, x_T, reverse steps). 1.0 is the paper's
    # eps ~ N(0, I) in d dims (|eps| ~ sqrt(d) radians against unit embeddings); 0 = auto,
    # 1 / sqrt(dim), so the noise's norm matches the unit embeddings' (DDPM's convention).
    noise_scale: float = 1.0
    dam_hidden: int = 256
    dam_layers: int = 2  # hidden layers of the denoiser MLP
    gem_weight: float = 1.0  # 0: the "w/o L_gem" ablation
    recon_weight: float = 0.1  # lambda; 0: "w/o L_recon"
    ssm_weight: float = 1.0  # mu; 0: "w/o L_ssm"
    # 0: L_ssm scores the same denoised x_0 as L_recon (one t ~ U[0, T), the paper).
    # f in (0, 1): L_ssm scores a second denoising from t ~ U[floor(f T), T), where x_t
    # carries (almost) nothing of the target.  At small t the denoiser can read the target
    # off x_t, so the paper's L_ssm rewards copying x_t, a skill serving never uses (it
    # starts from pure noise); see docs/model.md, DimeRec.
    ssm_min_step_frac: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of the last axis onto the unit sphere; an all-zero row stays zero."""
    axis = x.dim() - 1
    return x / x.norm(dim=axis, keepdim=True).clamp(min=NORM_EPS)


def geodesic_random_walk(x0: torch.Tensor, eps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``exp_{x0}[scale * eps_tangent]`` on the unit sphere (Algorithm 1, line 8).

    ``x0`` [B, d] unit rows, ``eps`` [B, d] standard Gaussian, ``scale`` [B, 1]
    (``sqrt(1 - abar_t)``).  ``eps`` is projected onto the tangent space at ``x0``; the
    exponential map is ``cos(|v|) x0 + sin(|v|) v / |v|``.  The result is re-normalised
    against rounding, so it is on the sphere to float precision.
    """
    tangent = eps - (eps * x0).sum(1, keepdim=True) * x0
    v = scale * tangent
    length = v.norm(dim=1, keepdim=True)
    direction = v / length.clamp(min=NORM_EPS)
    return l2_normalize(torch.cos(length) * x0 + torch.sin(length) * direction)


class MultiInterestExtractor(nn.Module):
    """ComiRec-SA: K attention distributions over the positions, ``g = A^T H``."""

    def __init__(self, dim: int, max_seq_len: int, interests: int, mult: int) -> None:
        super().__init__()
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.pos_emb.weight, std=EMBEDDING_STD)
        self.w1 = nn.Linear(dim, mult * dim)
        self.w2 = nn.Linear(mult * dim, interests)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h`` [B, L, d] (padding rows zero), ``mask`` [B, L] -> interests [B, K, d]."""
        length = h.shape[1]
        # Positions are right-aligned: the newest behaviour always gets the last one.
        start = self.pos_emb.num_embeddings - length
        scores = self.w2(torch.tanh(self.w1(h + self.pos_emb.weight[start:])))  # [B, L, K]
        scores = scores + (~mask)[:, :, None].to(scores.dtype) * NEG_INF
        attn = scores.softmax(dim=1) * mask[:, :, None].to(scores.dtype)  # empty rows: 0
        return attn.transpose(1, 2) @ h


class Denoiser(nn.Module):
    """``xhat_0 = MLP([x_t, step(t), g_1 .. g_K])`` (eq. 20)."""

    def __init__(self, dim: int, interests: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.dim = dim
        self.step_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        widths = [(2 + interests) * dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:], strict=False):
            blocks += [nn.Linear(width_in, width_out), nn.SiLU()]
        blocks.append(nn.Linear(widths[len(widths) - 1], dim))
        self.mlp = nn.Sequential(*blocks)

    def step_features(self, t: torch.Tensor) -> torch.Tensor:
        return self.step_mlp(sinusoidal_embedding(t, self.dim))

    def forward(self, xt: torch.Tensor, step: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """``xt`` [B, d], ``step`` [B or 1, d], ``guidance`` [B, K * d] -> [B, d]."""
        return self.mlp(torch.cat([xt, step.expand_as(xt), guidance], dim=1))


class DimeRec(SequentialRecommender):
    model_name = "dimerec"

    def __init__(self, n_items: int, config: DimeRecConfig) -> None:
        super().__init__(n_items, config.dim)
        if config.interests < 1 or config.diffusion_steps < 1:
            raise ValueError("dimerec needs interests >= 1 and diffusion_steps >= 1")
        if not 0.0 <= config.ssm_min_step_frac < 1.0:
            raise ValueError("dimerec needs 0 <= ssm_min_step_frac < 1")
        self.config = config
        d = config.dim
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=EMBEDDING_STD)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.input_drop = nn.Dropout(config.dropout)
        self.gem = MultiInterestExtractor(
            d, config.max_seq_len, config.interests, config.attention_mult
        )
        self.schedule = NoiseSchedule.create(
            config.schedule,  # type: ignore[arg-type]
            config.diffusion_steps,
            config.schedule_a,
            config.schedule_b,
            config.sigma_mode,  # type: ignore[arg-type]
        )
        # The forward process's coefficients as buffers: no host-to-device copy per batch.
        self.register_buffer("sqrt_abar", self.schedule.sqrt_abar.float(), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_abar", self.schedule.sqrt_one_minus_abar.float(), persistent=False
        )
        self.dam = (
            Denoiser(d, config.interests, config.dam_hidden, config.dam_layers)
            if config.use_diffusion
            else None
        )

    # ------------------------------------------------------------------ contract

    def item_embeddings(self) -> torch.Tensor:
        """On the sphere in the default mode (row 0, padding, stays zero)."""
        table = self.item_emb.weight
        return l2_normalize(table) if self.config.geodesic else table

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """``noise[0]`` is ``x_T``; ``noise[T - t]`` the draw of reverse step ``t > 0``
        (ComiRec-SA alone is deterministic: the base class's placeholder)."""
        if not self.config.use_diffusion:
            return super().noise_shape
        return (self.config.diffusion_steps, self.config.dim)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.target is not None
        cfg = self.config
        items = self.item_embeddings()
        interests = self.interests(batch.item_seq, items)  # [B, K, d]
        target = items[batch.target]  # [B, d]
        # L_gem (eq. 18-19): the interest nearest the target, scored against the items.
        nearest = (self._unit(interests) * target[:, None, :]).sum(2).argmax(dim=1)
        chosen = interests[torch.arange(len(nearest), device=nearest.device), nearest]
        gem_loss = self._softmax_loss(chosen, batch.target, items)
        total = cfg.gem_weight * gem_loss
        parts = {"gem": gem_loss.detach()}
        if self.dam is not None:
            x0 = target
            t = torch.randint(0, self.schedule.steps, (len(x0),), device=x0.device)
            x0_hat = self._denoise(self._add_noise(x0, torch.randn_like(x0), t), t, interests)
            recon_loss = (x0_hat - x0).pow(2).sum(1).mean()
            if cfg.ssm_min_step_frac > 0:
                low = min(int(cfg.ssm_min_step_frac * self.schedule.steps), self.schedule.steps - 1)
                t_ssm = torch.randint(low, self.schedule.steps, (len(x0),), device=x0.device)
                xt_ssm = self._add_noise(x0, torch.randn_like(x0), t_ssm)
                x0_hat = self._denoise(xt_ssm, t_ssm, interests)
            ssm_loss = self._softmax_loss(x0_hat, batch.target, items)
            total = total + cfg.recon_weight * recon_loss + cfg.ssm_weight * ssm_loss
            parts.update(recon=recon_loss.detach(), ssm=ssm_loss.detach())
        return total, parts

    def user_embedding(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        items = self.item_embeddings()
        interests = self.interests(batch.item_seq, items)
        if self.dam is None:
            user = self._served_interest(interests)
        else:
            user = self.generate(interests, noise)
        return keep_contract_inputs(user, batch, noise)

    def full_sort_scores(self, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.dam is not None:
            return super().full_sort_scores(batch, noise)
        # ComiRec-SA: each item's best score over the K interests.
        items = self.item_embeddings()
        interests = self._unit(self.interests(batch.item_seq, items))
        return (interests @ items.T).amax(dim=1)

    # ------------------------------------------------------------------ GEM

    def interests(self, item_seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, L] tokens -> the K interests [B, K, d] (``items`` = ``item_embeddings()``)."""
        mask = item_seq > 0
        h = self.input_drop(items[item_seq]) * mask[:, :, None].to(items.dtype)
        return self.gem(h, mask)

    def _served_interest(self, interests: torch.Tensor) -> torch.Tensor:
        """ComiRec-SA's one served vector: the mean of the K unit interests, re-normalised.

        (On ML-100K validation it beat the interest nearest the newest behaviour by far:
        recall@20 0.263 against 0.156, where the max over the K interests gives 0.293.)
        """
        return self._unit(self._unit(interests).mean(dim=1))

    # ------------------------------------------------------------------ DAM

    @property
    def eps_scale(self) -> float:
        """The factor applied to every standard Gaussian draw (``noise_scale``)."""
        scale = self.config.noise_scale
        return scale if scale > 0 else self.config.dim**-0.5

    def _add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = eps * self.eps_scale
        scale = self.sqrt_one_minus_abar[t][:, None].to(x0.dtype)
        if self.config.geodesic:
            return geodesic_random_walk(x0, eps, scale)
        return self.sqrt_abar[t][:, None].to(x0.dtype) * x0 + scale * eps

    def _denoise(self, xt: torch.Tensor, t: torch.Tensor, interests: torch.Tensor) -> torch.Tensor:
        assert self.dam is not None
        out = self.dam(xt, self.dam.step_features(t), interests.flatten(1))
        return self._unit(out)

    def generate(self, interests: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 2: T reverse steps from ``noise[0]`` guided by the interests; [B, d]."""
        assert self.dam is not None
        steps = self.schedule.steps
        if noise is None:
            noise = torch.randn(self.noise_shape, device=interests.device, dtype=interests.dtype)
        batch = interests.shape[0]
        guidance = interests.flatten(1)
        step_table = self.dam.step_features(torch.arange(steps, device=interests.device))
        xt = self._unit(noise[0][None, :].expand(batch, self.config.dim) * self.eps_scale)
        x0_hat = xt
        for t in range(steps - 1, -1, -1):
            x0_hat = self._unit(self.dam(xt, step_table[t : t + 1], guidance))
            step_noise = noise[steps - t][None, :] * self.eps_scale if t > 0 else None
            xt = self._unit(self.schedule.step(x0_hat, xt, t, step_noise))
        return x0_hat

    # ------------------------------------------------------------------ scoring

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """Onto the sphere in the default mode; the identity in Euclidean (w/o GRW) mode."""
        return l2_normalize(x) if self.config.geodesic else x

    def _softmax_loss(
        self, user: torch.Tensor, target: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of ``user`` [B, d] against the corpus (or sampled negatives)."""
        cfg = self.config
        scale = 1.0 / cfg.temperature if cfg.geodesic else 1.0
        user = self._unit(user)
        if cfg.negatives <= 0:
            logits = (user @ items.T) * scale
            logits[:, 0] = torch.finfo(logits.dtype).min
            return F.cross_entropy(logits.float(), target)
        # Sampled softmax with uniform negatives shared by the batch (uniform: no logQ term).
        negatives = torch.randint(1, self.n_items + 1, (cfg.negatives,), device=user.device)
        positive = (user * items[target]).sum(1, keepdim=True)
        negative = user @ items[negatives].T
        negative = negative.masked_fill(negatives[None, :] == target[:, None], NEG_INF)
        logits = torch.cat([positive, negative], dim=1) * scale
        return F.cross_entropy(logits.float(), torch.zeros_like(target))
