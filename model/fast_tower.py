"""An inference-only re-expression of a trained T2Diff user tower, for the ONNX export.

``FastTower(model)`` computes the same function as ``model.user_embedding(batch, noise)``
(eval mode) with the same parameters, laid out so the unrolled 50-step graph is small and
runs on plain matrix products:

* **channels-last U-Net.** Activations are ``[B, L, C]``, so ``ChannelNorm`` is a plain
  ``LayerNormalization`` over the last axis (no Transpose pairs), and every convolution is
  an im2col (a constant ``Gather`` of the zero-padded input, or a product with a constant
  0/1 shift matrix) followed by one ``MatMul``.  ORT's MatMul is ~2x more efficient than its
  ``Conv`` on these small 1-D convolutions.
* **pooling / upsampling as constants.** ``avg_pool1d(2, ceil_mode)`` is a constant
  ``[L/2, L]`` matrix; nearest upsampling (``repeat_interleave`` + crop) is folded into the
  im2col gather indices (or shift matrix) of the next convolution.
* **per-step constants folded.** The step embedding, step MLP and ``step_bias`` depend only
  on ``t``: ``silu(norm1(h)) + step_bias(t)`` feeds ``conv2`` only, so ``conv2(step_bias)``
  (a per-position constant, because of the zero padding) joins ``conv2``'s bias: one
  ``[L, C]`` constant per block and step, no step MLP and no extra node.  The DDPM posterior
  coefficient ``c0_t`` is folded into the output projection, ``c0_t * b_out + sigma_t *
  noise`` is computed for all steps in one vectorised op.
* **history once.** The history's share of the first convolution and of the first
  block's residual 1x1 convolution are computed once per request, not per step.
* **last step pruned.** At ``t = 0`` only the newest position of ``zhat_0`` is used, so the
  output projection runs on that position only.
* **residual biases folded forward.** A block's output is ``tail + x W_s + b_s``; ``b_s`` (and
  whatever constant its input carried) is a per-position constant that every consumer maps
  linearly (pooling, upsampling, the next convolutions, the 1x1 convolutions, the output
  projection), so it is carried into their biases instead of being added: no bias ``Add``
  on any residual path.
* **a pad row instead of a ``Pad`` per convolution.** Every activation carries one extra
  row (``[B, L + 1, C]``, the last row) whose value does not depend on the input: the im2col
  gathers read it where the convolution's zero padding would be, so no ``Pad`` node runs per
  step.  Where that row is not zero (after a norm and SiLU), its contribution ``p W_tap`` at
  the two boundary positions is a constant, subtracted in the convolution's per-position
  bias.  The pad row of ``z_t`` is held at zero by the per-step noise term.  In this layout
  every im2col is a gather (a shift product only saved a ``Pad``, at L / C_out of the
  convolution's FLOPs).
* **the state carried as what reads it.** ``z_t`` enters the U-Net only through the first
  convolution and the first residual 1x1 convolution, both linear, and ``z_{t-1}`` is
  linear in the last hidden layer and ``z_t``; so the pad-row ``forward`` carries
  ``q_t = [im2col(z_t) W_z | z_t W_sz] + cond`` and never forms ``z_t``: one
  ``[3 w0, 2 w0]`` product per step replaces three (``FastUNetSteps._build_state_products``).

The attention half of the tower (session self-attention, DIN, FFN) is the model's own
``_tower`` method, run once.  Nothing here changes training or the checkpoint format.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from model.base import Batch, keep_contract_inputs
from model.t2diff import T2Diff
from model.unet import ConvBlock, UNet1D


def _conv_weight(conv: nn.Conv1d) -> torch.Tensor:
    """``Conv1d(k=3)`` weight ``[Cout, Cin, 3]`` as an im2col matrix ``[3 * Cin, Cout]``."""
    weight = conv.weight.detach()
    return weight.permute(2, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _skip_weight(block: ConvBlock, c_in: int, c_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual path as ``(W [Cin, Cout], b [Cout])`` (identity when no 1x1 conv)."""
    if isinstance(block.skip, nn.Conv1d):
        return block.skip.weight.detach()[:, :, 0].T.contiguous(), block.skip.bias.detach()
    return torch.eye(c_in, c_out), torch.zeros(c_out)


def _pool_matrix(length: int) -> torch.Tensor:
    """``avg_pool1d(kernel 2, ceil_mode)`` as a ``[ceil(L/2), L]`` matrix (exact weights)."""
    eye = torch.eye(length, dtype=torch.float64)[None]  # [1, C=L (input pos), L]
    return F.avg_pool1d(eye, 2, ceil_mode=True)[0].T.contiguous()


def _upsample_index(out_len: int) -> torch.Tensor:
    """Source positions of ``repeat_interleave(2)[:out_len]``."""
    return torch.arange(out_len) // 2


def _im2col_index(out_len: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the zero-padded source (row 0 and the last are the pads) read by a k=3 conv.

    ``source[l]`` is the source row that logical position ``l`` reads (identity when None,
    the upsampling map for a nearest-upsampled input).  Result ``[out_len * 3]``, ordered
    (position, tap).
    """
    rows = []
    for pos in range(out_len):
        for tap in range(3):
            q = pos + tap - 1
            if 0 <= q < out_len:
                rows.append(1 + int(source[q]) if source is not None else 1 + q)
            else:
                rows.append(-1)  # a pad row: filled in below
    return torch.tensor(rows)


def _shift_matrix(out_len: int, src_len: int, source: torch.Tensor | None = None) -> torch.Tensor:
    """The im2col as a constant ``[out_len * 3, src_len]`` 0/1 matrix (zero rows at pads)."""
    matrix = torch.zeros(out_len * 3, src_len, dtype=torch.float64)
    for pos in range(out_len):
        for tap in range(3):
            q = pos + tap - 1
            if 0 <= q < out_len:
                matrix[pos * 3 + tap, int(source[q]) if source is not None else q] = 1.0
    return matrix


class _Im2col(nn.Module):
    """``x [B, src_len, C] -> [B, out_len, 3C]`` for a k=3, padding=1 convolution.

    ``pre``: an optional constant ``[src_len', src_len]`` linear map applied first
    (average pooling), folded into the shift matrix in ``matmul`` mode.
    """

    def __init__(
        self,
        out_len: int,
        src_len: int,
        channels: int,
        mode: str,
        source: torch.Tensor | None = None,
        c_out: int = 0,
    ) -> None:
        super().__init__()
        if mode == "auto":  # the shift product costs L / C_out of the conv's own FLOPs
            mode = "matmul" if out_len <= 0.5 * c_out else "gather"
        self.out_len, self.channels, self.mode = out_len, channels, mode
        if mode == "matmul":
            self.register_buffer("shift", _shift_matrix(out_len, src_len, source).float())
        elif mode == "gather":
            index = _im2col_index(out_len, source)
            index[index < 0] = 0  # row 0 of the padded input is zero
            self.register_buffer("index", index)
        else:
            raise ValueError(f"unknown im2col mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "matmul":
            cols = torch.matmul(self.shift, x)
        else:
            cols = F.pad(x, (0, 0, 1, 1)).index_select(1, self.index)
        return cols.reshape(-1, self.out_len, 3 * self.channels)


class _PaddedIm2col(nn.Module):
    """``x [B, L + 1, C] -> [B, L + 1, 3C]``: a k=3, padding=1 im2col in the pad-row layout.

    Row ``L`` of ``x`` and of the result is the pad row.  ``gather`` mode reads the pad row
    at the zero-padding taps (one ``Gather`` + ``Reshape``, no ``Pad``); the convolution then
    owes ``boundary(p, w)`` to its bias, ``p`` being the pad row's value.  ``matmul`` mode is
    a shift matrix that ignores the pad row (zero there), so it owes nothing.
    """

    def __init__(self, length: int, channels: int, mode: str) -> None:
        super().__init__()
        if mode == "auto":  # no Pad to save: a shift product only adds FLOPs
            mode = "gather"
        if mode not in ("matmul", "gather"):
            raise ValueError(f"unknown im2col mode {mode!r}")
        self.length, self.channels, self.mode = length, channels, mode
        taps = [(pos, tap, pos + tap - 1) for pos in range(length) for tap in range(3)]
        if mode == "matmul":
            shift = torch.zeros(3 * (length + 1), length + 1)
            for pos, tap, q in taps:
                if 0 <= q < length:
                    shift[pos * 3 + tap, q] = 1.0
            self.register_buffer("shift", shift)
        else:
            index = [q if 0 <= q < length else length for _, _, q in taps] + [length] * 3
            self.register_buffer("index", torch.tensor(index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "matmul":
            cols = torch.matmul(self.shift, x)
        else:
            cols = x.index_select(-2, self.index)
        if x.dim() == 2:  # one sample, no batch axis
            return cols.reshape(self.length + 1, 3 * self.channels)
        return cols.reshape(-1, self.length + 1, 3 * self.channels)

    def boundary(self, pad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[L + 1, C_out]``: what reading the pad row ``pad`` adds to the convolution
        ``weight`` (``[3C, C_out]``) at the zero-padding taps (zero in ``matmul`` mode)."""
        out = torch.zeros(self.length + 1, weight.shape[1], dtype=weight.dtype)
        if self.mode == "gather":
            c = self.channels
            for pos in range(self.length):
                for tap in range(3):
                    if not 0 <= pos + tap - 1 < self.length:
                        out[pos] += pad @ weight[tap * c : (tap + 1) * c]
        return out


def _pad_row(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``x`` with one zero row appended along ``dim`` (a sequence axis)."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class FastUNetSteps(nn.Module):
    """The T reverse steps of ``T2Diff.reconstruct`` (channels-last, constants folded).

    ``pad_rows`` (default): run in the pad-row layout (``_PaddedIm2col``), where ``mode``
    ``auto`` means every im2col is a gather: with no ``Pad`` to save, the shift products only
    add FLOPs (ML-1M, both widths, B = 1 and 64: -11% against ``auto``'s shift products at
    the deep levels).  ``pad_rows=False`` is the plain layout (``forward_unpadded``), with its
    own ``auto`` rule.
    """

    def __init__(self, model: T2Diff, mode: str = "auto", pad_rows: bool = True) -> None:
        super().__init__()
        cfg = model.config
        unet: UNet1D = model.unet
        schedule = model.schedule
        steps, length, dim = cfg.diffusion_steps, model.diffusion_length, cfg.dim
        self.steps, self.length, self.dim, self.drift = steps, length, dim, cfg.drift
        levels = len(unet.down)
        lengths = [length]
        for _ in range(1, levels):
            lengths.append(math.ceil(lengths[-1] / 2))
        self.lengths = lengths
        widths = [block.conv2.out_channels for block in unet.down]
        self.widths = widths
        with torch.no_grad():
            step_table = unet.step_features(torch.arange(steps))  # [T, step_dim]
            self._build(unet, step_table, lengths, widths, dim, mode)
            c0 = schedule.posterior_c0.float()
            ct = schedule.posterior_ct.float()
            sigma = schedule.sigma.float()
            w_out = unet.out.weight.detach()[:, :, 0].T  # [w0, d]
            b_out = unet.out.bias.detach()
            # z_{t-1} = c0_t (h W + b) + ct_t z_t + sigma_t n  (t > 0)
            self.register_buffer("out_w", c0[:, None, None] * w_out[None])  # [T, w0, d]
            self.register_buffer("out_w_last", w_out.clone())
            self.register_buffer("out_b_last", b_out.clone())
            self.register_buffer("c0_bout", (c0[:, None] * b_out[None])[:, None, :])  # [T,1,d]
            self.register_buffer("sigma", sigma[:, None, None].clone())  # [T, 1, 1]
            self.ct = [float(v) for v in ct]
            # the residual biases, carried forward into the consumers' biases
            out_off = self._fold_offsets().double() @ w_out.double()  # [L, d]
            self.register_buffer(
                "c0_bout_pos", (c0.double()[:, None, None] * (b_out.double() + out_off)).float()
            )  # [T, L, d]: c0_bout with the last block's carried bias
            self.register_buffer("out_b_last_pos", (b_out.double() + out_off[-1]).float())
            if pad_rows:  # the plain layout's users (the fused kernel) never read them
                self._build_pad_rows(mode)
        self.pad_rows = pad_rows

    def _build(
        self,
        unet: UNet1D,
        step_table: torch.Tensor,
        lengths: list[int],
        widths: list[int],
        dim: int,
        mode: str,
    ) -> None:
        def block_spec(block: ConvBlock, length: int, c_in: int, c_out: int) -> nn.Module:
            """Weights of one ``ConvBlock`` at sequence length ``length``, channels-last."""
            spec = nn.Module()
            spec.c_in, spec.c_out = c_in, c_out
            spec.im1 = _Im2col(length, length, c_in, mode, c_out=c_out)
            spec.im2 = _Im2col(length, length, c_out, mode, c_out=c_out)
            spec.register_buffer("w1", _conv_weight(block.conv1))
            spec.register_buffer("b1", block.conv1.bias.detach().clone())
            spec.register_buffer("w2", _conv_weight(block.conv2))
            # b2 + conv2(step_bias(t)) per position: [T, L, C] (zero padding makes it vary
            # along L at the ends)
            step_bias = block.step_bias(step_table)[:, :, None].expand(-1, -1, length)
            spec.register_buffer("c2", block.conv2(step_bias).transpose(1, 2).contiguous())
            skip_w, skip_b = _skip_weight(block, c_in, c_out)
            spec.register_buffer("ws", skip_w.contiguous())
            spec.register_buffer("bs", skip_b.clone())
            for name, module in (("1", block.norm1.norm), ("2", block.norm2.norm)):
                spec.register_buffer("g" + name, module.weight.detach().clone())
                spec.register_buffer("be" + name, module.bias.detach().clone())
            spec.eps = (float(block.norm1.norm.eps), float(block.norm2.norm.eps))
            return spec

        # ---- first block: conv1([z, x]) = conv_z(z) + cond(x); skip = skip_z(z) + skip_x(x)
        first = unet.down[0]
        l0, w0 = lengths[0], widths[0]
        self.first = block_spec(first, l0, 2 * dim, w0)
        self.im_z = _Im2col(l0, l0, dim, mode, c_out=w0)
        self.register_buffer("w_z", _conv_weight(unet.in_z))
        self.register_buffer("w_x", _conv_weight(unet.in_x))  # once per request
        self.register_buffer("b_x", unet.in_x.bias.detach().clone())
        skip_w, skip_b = self.first.ws, self.first.bs
        self.register_buffer("skip_z", skip_w[:dim].contiguous())
        self.register_buffer("skip_x", skip_w[dim:].contiguous())
        self.register_buffer("skip_xb", skip_b.clone())
        # ---- the other down blocks take avg_pool(h): a constant [L_k, L_{k-1}] matrix
        self.down_blocks = nn.ModuleList()
        for level in range(1, len(unet.down)):
            spec = block_spec(unet.down[level], lengths[level], widths[level - 1], widths[level])
            spec.register_buffer("pool", _pool_matrix(lengths[level - 1]).float())
            self.down_blocks.append(spec)
        # ---- up blocks take cat([upsample(h), skip]); the upsampling is a Gather
        self.up_blocks = nn.ModuleList()
        for i, block in enumerate(unet.up):
            level = len(unet.down) - 1 - i  # the level h comes from
            length = lengths[level - 1]
            spec = block_spec(block, length, widths[level] + widths[level - 1], widths[level - 1])
            spec.register_buffer("up", _upsample_index(length))
            self.up_blocks.append(spec)

    def _fold_offsets(self) -> torch.Tensor:
        """Fold every residual bias ``b_s`` forward; returns the last block's offset ``[L, w0]``.

        The graph computes each block's output less a per-position constant ``off`` (its
        "offset"): ``h = tail + x_in W_s`` where the true output is ``h + off`` with
        ``off = off_in W_s + b_s``.  Consumers are linear in ``h`` up to their bias, so
        ``conv1(im2col(x_in + off_in)) + b_1`` becomes ``conv1(im2col(x_in)) + b1_pos`` with the
        ``[L, C]`` constant ``b1_pos = conv1(im2col(off_in)) + b_1`` (per position: the zero
        padding), and the output projection's bias takes the last offset.  Sets ``b1_pos`` on
        every block spec after the first (whose residual bias is in ``skip_x``, once per request).
        """

        def fold(spec: nn.Module, off_in: torch.Tensor) -> torch.Tensor:
            cols = spec.im1(off_in[None].float()).double()[0]
            spec.register_buffer("b1_pos", (cols @ spec.w1.double() + spec.b1.double()).float())
            return off_in @ spec.ws.double() + spec.bs.double()

        off = torch.zeros(self.lengths[0], self.widths[0], dtype=torch.float64)
        offs = [off]
        for spec in self.down_blocks:
            off = fold(spec, spec.pool.double() @ off)
            offs.append(off)
        offs.pop()
        for spec in self.up_blocks:
            off = fold(spec, torch.cat([off.index_select(0, spec.up), offs.pop()], dim=1))
        return off

    def _build_pad_rows(self, mode: str) -> None:
        """The pad-row layout (``_PaddedIm2col``): padded im2col, pooling and upsampling maps,
        and the biases less what reading each source's pad row adds at the boundaries.

        The pad rows do not depend on the input or on the step (the per-step constants are
        zero there and ``z_t``'s pad row is held at zero), so one float64 pass of the U-Net
        on them gives every source's pad row; the boundary terms only touch real rows, so
        they do not change the pad rows they were computed from.
        """
        l0, dim = self.lengths[0], self.dim
        self.pim_z = _PaddedIm2col(l0, dim, mode)
        specs = [self.first, *self.down_blocks, *self.up_blocks]
        for spec in specs:
            length = spec.c2.shape[1]
            if spec is not self.first:
                spec.pim1 = _PaddedIm2col(length, spec.c_in, mode)
                spec.register_buffer("b1p", _pad_row(spec.b1_pos))
            spec.pim2 = _PaddedIm2col(length, spec.c_out, mode)
            spec.register_buffer("c2p", _pad_row(spec.c2))
        for spec in self.down_blocks:
            pool = spec.pool
            spec.register_buffer("ppool", _pad_row(_pad_row(pool), dim=1))
        for i, spec in enumerate(self.up_blocks):
            src_len = self.lengths[len(self.up_blocks) - i]
            spec.register_buffer("pup", torch.cat([spec.up, torch.tensor([src_len])]))
        self.register_buffer("c0_bout_pad", _pad_row(self.c0_bout_pos))
        # one float64 pass on the pad rows (real rows: an all-zero history), recording what
        # every gather-mode convolution reads there
        self.double()
        try:
            owed: list[tuple[nn.Module, str, torch.Tensor]] = []
            zeros = torch.zeros(1, l0 + 1, dim, dtype=torch.float64)
            cond = torch.matmul(self.pim_z(zeros), self.w_x) + self.b_x
            skip_x = torch.matmul(zeros, self.skip_x) + self.skip_xb
            h = self._unet_p(zeros, cond, skip_x, 0, owed)
            for spec, name, term in owed:
                getattr(spec, name).sub_(term)  # c2p: [T, L + 1, C] - [L + 1, C]
            # z_{t-1}'s pad row = h_pad W_t + ct_t * 0 + e_t: e_t = -h_pad W_t keeps it zero
            self.c0_bout_pad[:, -1] = -(h[0, -1] @ self.out_w)
            self._build_state_products()
        finally:
            self.float()

    def _build_state_products(self) -> None:
        """The weights of ``forward``'s state recursion (``_reverse_q``), in float64.

        ``z_t`` enters the U-Net only through two products, ``im2col(z_t) W_z`` (the first
        convolution) and ``z_t W_sz`` (the first block's residual 1x1 convolution): together
        ``q(z_t) = im2col(z_t) W_q`` with ``W_q = [W_z | W_sz on the centre tap]``.  Since
        ``z_{t-1} = h_t W_t + ct_t z_t + e_t`` is linear and im2col is a row gather,
        ``q(z_{t-1}) = im2col(h_t) M_t + ct_t q(z_t) + q(e_t)`` with
        ``M_t = blockdiag(W_t, W_t, W_t) W_q``.  So the state is carried as ``q`` ([L + 1,
        2 w0]) and ``z_t`` is never formed: one ``[3 w0, 2 w0]`` product per step instead of
        the output projection (``[w0, d]``), the ``z_t`` im2col product (``[3d, w0]``) and the
        residual one (``[d, w0]``): at d = 64, w0 = 16, 1,536 multiply-adds per row instead
        of 5,120 (78k instead of 261k per step and sample).
        """
        dim, w0 = self.dim, self.widths[0]
        w_q = torch.zeros(3 * dim, 2 * w0, dtype=torch.float64)
        w_q[:, :w0] = self.w_z
        w_q[dim : 2 * dim, w0:] = self.skip_z  # the centre tap is z_t itself
        self.register_buffer("w_q", w_q)
        out_w = self.out_w.double()  # [T, w0, d]
        m = torch.zeros(self.steps, 3 * w0, 2 * w0, dtype=torch.float64)
        for tap in range(3):
            rows = slice(tap * w0, (tap + 1) * w0)
            m[:, rows] = out_w @ w_q[tap * dim : (tap + 1) * dim]
        self.register_buffer("q_w", m)  # [T, 3 w0, 2 w0]; row block ``tap`` reads h's tap

    # ------------------------------------------------------------------ one step

    def _unet(
        self, zt: torch.Tensor, cond: torch.Tensor, skip_x: torch.Tensor, t: int
    ) -> torch.Tensor:
        """The U-Net's last hidden layer ``[B, L, w0]`` (before the output 1x1 conv), less
        the last block's offset (folded into ``c0_bout_pos`` and ``out_b_last_pos``)."""
        # cond is [B, L, w0]; the z_t product is [1, L, w0] at the first step (shared noise)
        pre = cond + torch.matmul(self.im_z(zt), self.w_z)
        return self._walk(pre, torch.matmul(zt, self.skip_z) + skip_x, t, padded=False)

    def _unet_p(
        self,
        zt: torch.Tensor,
        cond: torch.Tensor,
        skip_x: torch.Tensor,
        t: int,
        owed: list[tuple[nn.Module, str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``_unet`` in the pad-row layout: ``[B, L + 1, C]`` activations, no ``Pad`` node.

        ``owed`` (building only) collects the boundary terms of the gather-mode convolutions.
        """
        # z_t's pad row is zero (up to rounding), so the z_t convolution owes nothing
        pre = cond + torch.matmul(self.pim_z(zt), self.w_z)
        skip = torch.matmul(zt, self.skip_z) + skip_x
        return self._walk(pre, skip, t, padded=True, owed=owed)

    def _walk(
        self,
        pre: torch.Tensor,
        skip: torch.Tensor,
        t: int,
        padded: bool,
        owed: list[tuple[nn.Module, str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The U-Net from the first block's conv1 output ``pre`` (its bias included) and
        residual ``skip``, the two places ``z_t`` enters, in either layout: the plain one
        (``_Im2col``, per-position biases ``b1_pos`` / ``c2``) or the pad-row one
        (``_PaddedIm2col``, ``b1p`` / ``c2p``, pooling and upsampling maps with pad rows).

        Each block's output is less its offset (``_fold_offsets``): no bias on a residual.
        ``owed`` (pad-row layout, building only) collects the boundary terms of the
        gather-mode convolutions: what reading a source's pad row adds, per bias.
        """

        def conv(
            spec: nn.Module, which: str, x: torch.Tensor, weight: torch.Tensor
        ) -> torch.Tensor:
            im = getattr(spec, f"pim{which}" if padded else f"im{which}")
            if owed is not None:
                owed.append((spec, "b1p" if which == "1" else "c2p", im.boundary(x[0, -1], weight)))
            return torch.matmul(im(x), weight)

        def tail(spec: nn.Module, pre: torch.Tensor) -> torch.Tensor:
            """norm1 -> SiLU -> conv2 (+ folded bias and step bias) -> norm2 -> SiLU."""
            h = F.silu(F.layer_norm(pre, spec.g1.shape, spec.g1, spec.be1, spec.eps[0]))
            h = conv(spec, "2", h, spec.w2) + (spec.c2p if padded else spec.c2)[t]
            return F.silu(F.layer_norm(h, spec.g2.shape, spec.g2, spec.be2, spec.eps[1]))

        def block(spec: nn.Module, x_in: torch.Tensor) -> torch.Tensor:
            pre = conv(spec, "1", x_in, spec.w1) + (spec.b1p if padded else spec.b1_pos)
            return tail(spec, pre) + torch.matmul(x_in, spec.ws)

        h = tail(self.first, pre) + skip
        skips = [h]
        for spec in self.down_blocks:
            # in the pad-row layout the pooled pad row is exactly zero
            h = block(spec, torch.matmul(spec.ppool if padded else spec.pool, h))
            skips.append(h)
        skips.pop()
        for spec in self.up_blocks:
            up = spec.pup if padded else spec.up
            h = block(spec, torch.cat([h.index_select(-2, up), skips.pop()], dim=-1))
        return h

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x`` history ``[B, L, d]``, ``noise`` ``[T, L, d]`` -> ``xhat_{n+1}`` ``[B, d]``.

        Runs in the pad-row layout (``_unet_p``) when ``pad_rows``, else ``forward_unpadded``.
        """
        if not self.pad_rows:
            return self.forward_unpadded(x, noise)
        x_p = _pad_row(x)  # the history's pad row is zero: cond's is b_x
        cond = torch.matmul(self.pim_z(x_p), self.w_x) + self.b_x
        skip_x = torch.matmul(x_p, self.skip_x) + self.skip_xb
        # noise term of every step t > 0: c0_t b_out + sigma_t noise[T - t]; index by t
        flipped = torch.flip(noise[1:], dims=[0])  # flipped[t - 1] = noise[T - t]
        extra = self.c0_bout_pad[1:] + _pad_row(self.sigma[1:] * flipped)  # [T-1, L+1, d]
        z_first = _pad_row(noise[0] if x.dim() == 2 else noise[:1])  # broadcast over the batch
        return self._reverse_q(x, z_first, torch.cat([cond, skip_x], dim=-1), extra)

    def _reverse_q(
        self, x: torch.Tensor, z_first: torch.Tensor, cond: torch.Tensor, extra: torch.Tensor
    ) -> torch.Tensor:
        """The T reverse steps from ``z_first`` (= z_T) -> ``xhat_{n+1}``, carrying
        ``q'_t = q(z_t) + cond`` instead of ``z_t`` (``_build_state_products``); ``cond`` is
        ``[cond | skip_x]`` ([B, L + 1, 2 w0]).

        ``q'_{t-1} = im2col(h_t) M_t + ct_t q'_t + k_t`` with the per-request constants
        ``k_t = q(e_t) + (1 - ct_t) cond``, all made by three products before the loop.
        """
        w0 = self.widths[0]
        ones = [1] * cond.dim()
        ct = torch.tensor(self.ct[1:], dtype=x.dtype).reshape(-1, *ones)  # [T - 1, 1, ...]
        q_e = torch.matmul(self.pim_z(extra), self.w_q)  # [T - 1, L + 1, 2 w0]
        k = q_e.reshape(q_e.shape[0], *ones[2:], *q_e.shape[1:]) + (1.0 - ct) * cond[None]
        q = torch.matmul(self.pim_z(z_first), self.w_q) + cond  # [B, L + 1, 2 w0]
        for t in range(self.steps - 1, 0, -1):
            pre, skip = q.split([w0, w0], dim=-1)
            h = self._walk(pre, skip, t, padded=True)
            q = torch.matmul(self.first.pim2(h), self.q_w[t]) + self.ct[t] * q + k[t - 1]
        pre, skip = q.split([w0, w0], dim=-1)
        return self._readout(self._walk(pre, skip, 0, padded=True), x)

    def _readout(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``xhat_{n+1}`` from the last step's hidden layer: ``zhat_0`` at the newest
        position only (plus the drift's history term)."""
        z0_last = torch.matmul(h[..., self.length - 1, :], self.out_w_last) + self.out_b_last_pos
        return z0_last + x[..., self.length - 1, :] if self.drift else z0_last

    def forward_unpadded(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``forward`` without the pad-row layout (a ``Pad`` per gather-mode im2col)."""
        cond = torch.matmul(self.im_z(x), self.w_x) + self.b_x
        skip_x = torch.matmul(x, self.skip_x) + self.skip_xb
        # noise term of every step t > 0: c0_t b_out + sigma_t noise[T - t]; index by t
        flipped = torch.flip(noise[1:], dims=[0])  # flipped[t - 1] = noise[T - t]
        extra = self.c0_bout_pos[1:] + self.sigma[1:] * flipped  # [T - 1, L, d]
        extras = extra.split(1, dim=0)
        zt = noise[:1]  # [1, L, d], broadcast over the batch
        for t in range(self.steps - 1, 0, -1):
            h = self._unet(zt, cond, skip_x, t)
            zt = torch.matmul(h, self.out_w[t]) + self.ct[t] * zt + extras[t - 1]
        return self._readout(self._unet(zt, cond, skip_x, 0), x)


class FastTower(nn.Module):
    """``forward(item_seq, time_lag, noise) -> user_embedding``: the ONNX contract."""

    def __init__(self, model: T2Diff, mode: str = "auto", pad_rows: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        self.use_diffusion = model.config.use_diffusion
        self.steps = FastUNetSteps(model, mode, pad_rows) if self.use_diffusion else None

    def forward(
        self, item_seq: torch.Tensor, time_lag: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        batch = Batch(item_seq, time_lag)
        x = self.model.item_emb(item_seq)
        x_next = (
            self.steps(self.model.diffusion_window(x), noise) if self.steps is not None else None
        )
        user = self.model._tower(batch, x, x_next)
        return keep_contract_inputs(user, batch, noise)


class FastDiffusionPart(nn.Module):
    """``forward(item_seq, noise) -> xhat [B, d]``: the reverse process alone.

    The ``diffusion`` graph of a split export (``contracts.tower``).  It reads no time lag,
    so its output depends only on the padded ``item_seq`` row and the version's noise.
    """

    def __init__(self, model: T2Diff, mode: str = "auto", one_sample: bool = False) -> None:
        super().__init__()
        if not model.config.use_diffusion:
            raise ValueError("a T2Diff without diffusion has no diffusion part")
        self.model = model.eval()
        self.steps = FastUNetSteps(model, mode)
        # one_sample: item_seq is [1, L] and the reverse process runs without a batch axis
        # (2-D activations: a product and its bias become one Gemm in ONNX Runtime)
        self.one_sample = one_sample

    def forward(self, item_seq: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = self.model.diffusion_window(self.model.item_emb(item_seq))
        return self.steps(x[0], noise)[None] if self.one_sample else self.steps(x, noise)


class FastAttentionPart(nn.Module):
    """``forward(item_seq, time_lag, xhat) -> user_embedding``: the tower after the
    reverse process (session attention with ``xhat``, DIN over the history with the lags).

    ``FastAttentionPart(m)(s, lag, FastDiffusionPart(m)(s, noise)) == FastTower(m)(s, lag,
    noise)``: the same modules in the same order, only cut in two.
    """

    def __init__(self, model: T2Diff) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(
        self, item_seq: torch.Tensor, time_lag: torch.Tensor, xhat: torch.Tensor
    ) -> torch.Tensor:
        batch = Batch(item_seq, time_lag)
        user = self.model._tower(batch, self.model.item_emb(item_seq), xhat)
        return keep_contract_inputs(user, batch, None)
