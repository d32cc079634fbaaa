"""The T2Diff reverse process as ONE Triton kernel: all T U-Net steps, no launch per layer.

Why: at batch 1 the 50 reverse steps of the U-Net are ~50 x 40 small sequential kernels, so
a GPU spends its time launching, not computing (CUDA graph of ``FastTower`` on an H100:
~13 ms for 0.45 GFLOP).  Here one program (one CTA) runs every step of the reverse process
for ``SPP`` samples: the layers of a step are separated by a CTA barrier, activations live
in a small per-program scratch area (L1/L2-resident), weights are read from L2.  A request
is then one launch for the diffusion plus the attention half of the tower.

What it computes is ``model.fast_tower.FastUNetSteps`` (the channels-last re-expression of
``T2Diff.reconstruct``): the history's share of the first convolution and residual
(``cond``, ``skip_x``) and the per-step noise terms are computed once in torch, the kernel
runs the T steps and returns ``zhat_0`` at the newest position.  The kernel is written for
the model's 3-level U-Net (widths ``w, 2w, 4w``); ``FusedUNetSteps`` refuses other shapes.

Precision: ``precision="ieee"`` does every product in float32 on the CUDA cores (matches
eager within 1e-4); ``"tf32x3"`` uses the tensor cores with three tf32 products (near
float32); ``"tf32"`` one tf32 product (about 3e-4 relative) and ``"bf16"`` bfloat16
operands (float32 accumulation, norms and state), both judged by ranking recall.

Triton is optional: importing this module without it works, ``FusedUNetSteps`` then raises.
The kernel's arithmetic runs on a CPU under ``TRITON_INTERPRET=1`` (tests do that).
``service/`` never imports torch, so this is a model-side path (benchmarked in
``bench/gpu_tower.py``); a GPU deployment would serve it from a torch process.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.base import Batch, keep_contract_inputs
from model.fast_tower import FastUNetSteps
from model.t2diff import T2Diff

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the module still imports, the kernel is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

PRECISIONS = ("ieee", "tf32x3", "tf32", "tf32x3tail", "bf16")
# "tf32x3tail": tf32 operands in every reverse step but the last ``exact_tail``, which run in
# tf32x3.  The reverse process damps what a step's rounding changes by the steps after it:
# on ML-1M (w16, all 6,040 users, bench/tf32_tail_emulation.py) tf32 everywhere moves the
# user embedding by up to 1.1e-2, tf32 with the last 5 steps exact by up to 5.4e-5, rankings
# unchanged (docs/results/inference.md, "The tf32x3 tail").
TAIL_PRECISION = "tf32x3"
KERNELS = ("auto", "pipelined", "uniform")


def _round_tf32_host(values: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest tf32 (ties away from zero), as the kernel's ``_round_tf32``."""
    bits = values.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _rows_block(length: int) -> int:
    """Rows of one sample in a tile: a power of two >= 16 (tl.dot's smallest M)."""
    return max(16, 1 << (length - 1).bit_length())


def _pack_block(
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    c2: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``[w1 (3Cin, Cout), b1, w2 (3Cout, Cout), c2 (T, L, Cout), ws (Cin, Cout), bs, g1, be1,
    g2, be2]`` flattened; the kernel's ``_block`` reads it with the same offsets."""
    parts = [w1, b1, w2, c2, ws, bs, *norms]
    return torch.cat([p.detach().float().reshape(-1) for p in parts])


if HAVE_TRITON:

    @triton.jit
    def _load_rows(
        src,
        samp,
        q,
        valid,
        SRC_L: tl.constexpr,
        C: tl.constexpr,
        KC: tl.constexpr,
        k0,
        MODE: tl.constexpr,
    ):
        """Rows ``q`` (channels ``k0 .. k0+KC``) of each row's sample in ``src`` [*, SRC_L, C].

        MODE 0: row q itself; 1: nearest upsampling (row q // 2); 2: average pooling by 2 with
        ceil mode (rows 2q, 2q + 1; a last window of one row divides by 1).
        """
        cols = k0 + tl.arange(0, KC)
        base = src + samp * (SRC_L * C)
        if MODE == 0:
            tile = tl.load(
                base[:, None] + q[:, None] * C + cols[None, :], mask=valid[:, None], other=0.0
            )
        elif MODE == 1:
            tile = tl.load(
                base[:, None] + (q // 2)[:, None] * C + cols[None, :],
                mask=valid[:, None],
                other=0.0,
            )
        else:
            first = tl.load(
                base[:, None] + (2 * q)[:, None] * C + cols[None, :], mask=valid[:, None], other=0.0
            )
            has_second = valid & (2 * q + 1 < SRC_L)
            second = tl.load(
                base[:, None] + (2 * q + 1)[:, None] * C + cols[None, :],
                mask=has_second[:, None],
                other=0.0,
            )
            tile = (first + second) * tl.where(has_second, 0.5, 1.0)[:, None]
        return tile

    @triton.jit
    def _round_tf32(x):
        """float32 -> the nearest tf32 (ties away from zero), kept in float32 storage."""
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = ~0x1FFF

    @triton.jit
    def _operand(x, PREC: tl.constexpr):
        """An activation as the products of ``PREC`` will read it.  The tensor cores truncate
        float32 operands to tf32 (a biased error); rounding each activation once where it
        is made (and the weights on the host, ``FusedUNetSteps``) halves the error of tf32
        steps and removes the bias, at the cost of one rounding per stored value."""
        if PREC == "tf32":
            x = _round_tf32(x)
        return x

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr):
        """``a @ b`` in float32 accumulation; operands as ``PREC`` says."""
        if PREC == "bf16":
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            out = tl.dot(a, b, input_precision=PREC)
        return out

    @triton.jit
    def _conv_part(
        acc,
        skip,
        weights,
        w1_off,
        ws_off,
        src,
        samp,
        pos,
        L: tl.constexpr,
        SRC_L: tl.constexpr,
        C: tl.constexpr,
        ROW0: tl.constexpr,
        CIN: tl.constexpr,
        COUT: tl.constexpr,
        MODE: tl.constexpr,
        WITH_SKIP: tl.constexpr,
        KC: tl.constexpr,
        PREC: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        """acc += conv3(part) (padding 1); skip += part @ ws (the 1x1 residual), both over the
        part's channels, which are rows ``ROW0 ..`` of each tap of the im2col weight.

        ``KC``: channels per product (this part's own: min(cap, C), so a wide part takes few
        large products instead of many small ones; each product is one dependent L2 round
        trip).  ``PREFETCH``: the loads of round i + 1 are issued before the product of
        round i (one software-pipelining stage by hand: Triton's ``num_stages`` must stay 1
        because the scratch reads may not be hoisted over the CTA barriers).
        """
        # Run-time loops (not unrolled): one copy of each product in the code keeps the
        # kernel small (the unrolled version compiled for 5 minutes and ran out of the
        # instruction cache).
        oc = tl.arange(0, COUT)
        NCH: tl.constexpr = C // KC
        if PREFETCH:
            q = pos - 1
            tile = _load_rows(src, samp, q, (q >= 0) & (q < L), SRC_L, C, KC, 0, MODE)
            weight = tl.load(
                weights + w1_off + (ROW0 + tl.arange(0, KC))[:, None] * COUT + oc[None, :]
            )
            for i in range(1, 3 * NCH):
                tap = i // NCH
                k0 = (i % NCH) * KC
                q = pos + (tap - 1)
                next_tile = _load_rows(src, samp, q, (q >= 0) & (q < L), SRC_L, C, KC, k0, MODE)
                krow = ROW0 + k0 + tl.arange(0, KC)
                next_weight = tl.load(
                    weights + w1_off + (tap * CIN + krow)[:, None] * COUT + oc[None, :]
                )
                acc += _dot(tile, weight, PREC)
                tile = next_tile
                weight = next_weight
            acc += _dot(tile, weight, PREC)
        else:
            for tap in range(3):
                q = pos + (tap - 1)
                valid = (q >= 0) & (q < L)
                for k0 in range(0, C, KC):
                    tile = _load_rows(src, samp, q, valid, SRC_L, C, KC, k0, MODE)
                    krow = ROW0 + k0 + tl.arange(0, KC)
                    weight = tl.load(
                        weights + w1_off + (tap * CIN + krow)[:, None] * COUT + oc[None, :]
                    )
                    acc += _dot(tile, weight, PREC)
        if WITH_SKIP:
            for k0 in range(0, C, KC):
                tile = _load_rows(src, samp, pos, pos < L, SRC_L, C, KC, k0, MODE)
                krow = ROW0 + k0 + tl.arange(0, KC)
                w_skip = tl.load(weights + ws_off + krow[:, None] * COUT + oc[None, :])
                skip += _dot(tile, w_skip, PREC)
        return acc, skip

    @triton.jit
    def _ln_silu(h, weights, g_off, b_off, COUT: tl.constexpr, EPS: tl.constexpr):
        oc = tl.arange(0, COUT)
        mean = tl.sum(h, axis=1) / COUT
        centred = h - mean[:, None]
        var = tl.sum(centred * centred, axis=1) / COUT
        normed = centred * (1.0 / tl.sqrt(var + EPS))[:, None]
        normed = (
            normed * tl.load(weights + g_off + oc)[None, :] + tl.load(weights + b_off + oc)[None, :]
        )
        return normed * tl.sigmoid(normed)

    @triton.jit
    def _block(
        weights,
        BASE: tl.constexpr,
        t,
        samp,
        pos,
        a_src,
        A_L: tl.constexpr,
        A_C: tl.constexpr,
        A_MODE: tl.constexpr,
        b_src,
        B_L: tl.constexpr,
        B_C: tl.constexpr,
        extra_pre,
        extra_skip,
        HAS_EXTRA: tl.constexpr,
        tmp,
        out,
        STORE: tl.constexpr,
        L: tl.constexpr,
        COUT: tl.constexpr,
        T: tl.constexpr,
        R: tl.constexpr,
        A_KC: tl.constexpr,
        B_KC: tl.constexpr,
        O_KC: tl.constexpr,
        PREC: tl.constexpr,
        EPS: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        """One ``ConvBlock`` on ``cat([a, b])`` (``b`` optional): conv3 -> LN -> SiLU -> conv3
        (+ folded bias and step bias) -> LN -> SiLU, plus the 1x1 residual.  Result [R, COUT]
        in registers and (STORE) in ``out`` [*, L, COUT]."""
        CIN: tl.constexpr = A_C + B_C
        W1: tl.constexpr = BASE
        B1: tl.constexpr = W1 + 3 * CIN * COUT
        W2: tl.constexpr = B1 + COUT
        C2: tl.constexpr = W2 + 3 * COUT * COUT
        WS: tl.constexpr = C2 + T * L * COUT
        BS: tl.constexpr = WS + CIN * COUT
        G1: tl.constexpr = BS + COUT
        BE1: tl.constexpr = G1 + COUT
        G2: tl.constexpr = BE1 + COUT
        BE2: tl.constexpr = G2 + COUT
        oc = tl.arange(0, COUT)
        row_ok = pos < L
        acc = tl.zeros([R, COUT], dtype=tl.float32)
        skip = tl.zeros([R, COUT], dtype=tl.float32)
        acc, skip = _conv_part(
            acc, skip, weights, W1, WS, a_src, samp, pos, L, A_L, A_C, 0, CIN, COUT, A_MODE, True,
            A_KC, PREC, PREFETCH,
        )  # fmt: skip
        if B_C > 0:
            acc, skip = _conv_part(
                acc, skip, weights, W1, WS, b_src, samp, pos, L, B_L, B_C, A_C, CIN, COUT, 0, True,
                B_KC, PREC, PREFETCH,
            )  # fmt: skip
        act_offs = samp[:, None] * (L * COUT) + pos[:, None] * COUT + oc[None, :]
        pre = acc + tl.load(weights + B1 + oc)[None, :]
        skip = skip + tl.load(weights + BS + oc)[None, :]
        if HAS_EXTRA:
            pre += tl.load(extra_pre + act_offs, mask=row_ok[:, None], other=0.0)
            skip += tl.load(extra_skip + act_offs, mask=row_ok[:, None], other=0.0)
        hidden = _ln_silu(pre, weights, G1, BE1, COUT, EPS)
        tl.store(tmp + act_offs, _operand(hidden, PREC), mask=row_ok[:, None])
        tl.debug_barrier()  # conv2 reads neighbouring rows written by other threads
        acc2 = tl.zeros([R, COUT], dtype=tl.float32)
        acc2, skip = _conv_part(
            acc2, skip, weights, W2, WS, tmp, samp, pos, L, L, COUT, 0, COUT, COUT, 0, False,
            O_KC, PREC, PREFETCH,
        )  # fmt: skip
        acc2 += tl.load(weights + C2 + t * (L * COUT) + pos[:, None] * COUT + oc[None, :],
                        mask=row_ok[:, None], other=0.0)  # fmt: skip
        result = _operand(_ln_silu(acc2, weights, G2, BE2, COUT, EPS) + skip, PREC)
        if STORE:
            tl.store(out + act_offs, result, mask=row_ok[:, None])
        tl.debug_barrier()  # the next block reads ``out``; ``tmp`` is reused
        return result

    @triton.jit
    def _unet(
        weights,
        t,
        zbuf,
        cond,
        skip_x,
        tmp0,
        tmp1,
        tmp2,
        h0,
        d1,
        d2,
        u1,
        s0,
        p0,
        s1,
        p1,
        s2,
        p2,
        FIRST: tl.constexpr,
        DOWN1: tl.constexpr,
        DOWN2: tl.constexpr,
        UP1: tl.constexpr,
        UP0: tl.constexpr,
        L0: tl.constexpr,
        L1: tl.constexpr,
        L2: tl.constexpr,
        W0: tl.constexpr,
        W1: tl.constexpr,
        W2: tl.constexpr,
        D: tl.constexpr,
        T: tl.constexpr,
        R0: tl.constexpr,
        R1: tl.constexpr,
        R2: tl.constexpr,
        KCD: tl.constexpr,
        KC0: tl.constexpr,
        KC1: tl.constexpr,
        KC2: tl.constexpr,
        PREC: tl.constexpr,
        EPS: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        """One U-Net pass at step ``t``: the last hidden layer [R0, W0] (before ``out``)."""
        _block(weights, FIRST, t, s0, p0, zbuf, L0, D, 0, zbuf, L0, 0, cond, skip_x, True,
               tmp0, h0, True, L0, W0, T, R0, KCD, KCD, KC0, PREC, EPS, PREFETCH)  # fmt: skip
        _block(weights, DOWN1, t, s1, p1, h0, L0, W0, 2, h0, L0, 0, cond, skip_x, False,
               tmp1, d1, True, L1, W1, T, R1, KC0, KC0, KC1, PREC, EPS, PREFETCH)  # fmt: skip
        _block(weights, DOWN2, t, s2, p2, d1, L1, W1, 2, d1, L1, 0, cond, skip_x, False,
               tmp2, d2, True, L2, W2, T, R2, KC1, KC1, KC2, PREC, EPS, PREFETCH)  # fmt: skip
        _block(weights, UP1, t, s1, p1, d2, L2, W2, 1, d1, L1, W1, cond, skip_x, False,
               tmp1, u1, True, L1, W1, T, R1, KC2, KC1, KC1, PREC, EPS, PREFETCH)  # fmt: skip
        return _block(weights, UP0, t, s0, p0, u1, L1, W1, 1, h0, L0, W0, cond, skip_x, False,
                      tmp0, h0, False, L0, W0, T, R0, KC1, KC0, KC0, PREC, EPS,
                      PREFETCH)  # fmt: skip

    @triton.jit
    def _reverse_step(weights, t, z, zbuf, z_offs, step_offs, w_offs, row_ok, cond, skip_x,
                      extras, ct, out_w, tmp0, tmp1, tmp2, h0, d1, d2, u1,
                      s0, p0, s1, p1, s2, p2, FIRST: tl.constexpr, DOWN1: tl.constexpr,
                      DOWN2: tl.constexpr, UP1: tl.constexpr, UP0: tl.constexpr,
                      L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, W0: tl.constexpr,
                      W1: tl.constexpr, W2: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
                      R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                      KCD: tl.constexpr, KC0: tl.constexpr, KC1: tl.constexpr,
                      KC2: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr,
                      PREFETCH: tl.constexpr):  # fmt: skip
        """Reverse step ``t``: z_t (registers and ``zbuf``) -> z_{t-1}."""
        hidden = _unet(weights, t, zbuf, cond, skip_x, tmp0, tmp1, tmp2, h0, d1, d2, u1,
                       s0, p0, s1, p1, s2, p2, FIRST, DOWN1, DOWN2, UP1, UP0,
                       L0, L1, L2, W0, W1, W2, D, T, R0, R1, R2, KCD, KC0, KC1, KC2,
                       PREC, EPS, PREFETCH)  # fmt: skip
        # z_{t-1} = c0_t (h W_out + b_out) + ct_t z_t + sigma_t noise (c0 folded in out_w);
        # at t = 0: zhat_0 = h W_out + b_out (ct = 0, extras[0] = b_out, plain W_out)
        z = (
            _dot(hidden, tl.load(out_w + t * (W0 * D) + w_offs), PREC)
            + tl.load(ct + t) * z
            + tl.load(extras + t * (L0 * D) + step_offs, mask=row_ok[:, None], other=0.0)
        )
        tl.store(zbuf + z_offs, z, mask=row_ok[:, None])
        tl.debug_barrier()
        return z

    @triton.jit
    def _reverse_kernel(
        weights,
        cond,
        skip_x,
        noise0,
        extras,
        ct,
        out_w,
        tail_weights,
        tail_out_w,
        result,
        zbuf,
        tmp0,
        tmp1,
        tmp2,
        h0,
        d1,
        d2,
        u1,
        n_samples,
        FIRST: tl.constexpr,
        DOWN1: tl.constexpr,
        DOWN2: tl.constexpr,
        UP1: tl.constexpr,
        UP0: tl.constexpr,
        L0: tl.constexpr,
        L1: tl.constexpr,
        L2: tl.constexpr,
        BL0: tl.constexpr,
        BL1: tl.constexpr,
        BL2: tl.constexpr,
        W0: tl.constexpr,
        W1: tl.constexpr,
        W2: tl.constexpr,
        D: tl.constexpr,
        T: tl.constexpr,
        SPP: tl.constexpr,
        KCD: tl.constexpr,
        KC0: tl.constexpr,
        KC1: tl.constexpr,
        KC2: tl.constexpr,
        PREC: tl.constexpr,
        EPS: tl.constexpr,
        PREFETCH: tl.constexpr,
        TAIL: tl.constexpr,
        TAIL_PREC: tl.constexpr,
    ):
        """Program ``pid`` runs the T reverse steps of samples ``pid*SPP .. pid*SPP+SPP``."""
        pid = tl.program_id(0)
        R0: tl.constexpr = SPP * BL0
        R1: tl.constexpr = SPP * BL1
        R2: tl.constexpr = SPP * BL2
        r0 = tl.arange(0, R0)
        s0 = pid * SPP + r0 // BL0
        p0 = r0 % BL0
        r1 = tl.arange(0, R1)
        s1 = pid * SPP + r1 // BL1
        p1 = r1 % BL1
        r2 = tl.arange(0, R2)
        s2 = pid * SPP + r2 // BL2
        p2 = r2 % BL2
        dd = tl.arange(0, D)
        row_ok = p0 < L0
        z_offs = s0[:, None] * (L0 * D) + p0[:, None] * D + dd[None, :]
        step_offs = p0[:, None] * D + dd[None, :]
        z = tl.load(noise0 + step_offs, mask=row_ok[:, None], other=0.0)
        tl.store(zbuf + z_offs, z, mask=row_ok[:, None])
        tl.debug_barrier()
        w_offs = tl.arange(0, W0)[:, None] * D + dd[None, :]
        # Steps t = T-1 .. TAIL in PREC, the last TAIL steps (t < TAIL) in TAIL_PREC: the
        # reverse process damps a step's rounding by the steps after it, so tf32 in all but
        # the last few steps moves the answer ~60x less than tf32 everywhere.
        for i in range(0, T - TAIL):
            z = _reverse_step(weights, T - 1 - i, z, zbuf, z_offs, step_offs, w_offs, row_ok,
                              cond, skip_x, extras, ct, out_w, tmp0, tmp1, tmp2, h0, d1, d2, u1,
                              s0, p0, s1, p1, s2, p2, FIRST, DOWN1, DOWN2, UP1, UP0,
                              L0, L1, L2, W0, W1, W2, D, T, R0, R1, R2, KCD, KC0, KC1, KC2,
                              PREC, EPS, PREFETCH)  # fmt: skip
        if TAIL > 0:
            for i in range(T - TAIL, T):
                z = _reverse_step(tail_weights, T - 1 - i, z, zbuf, z_offs, step_offs, w_offs,
                                  row_ok, cond, skip_x, extras, ct, tail_out_w, tmp0, tmp1, tmp2,
                                  h0, d1, d2, u1, s0, p0, s1, p1, s2, p2,
                                  FIRST, DOWN1, DOWN2, UP1, UP0, L0, L1, L2, W0, W1, W2, D, T,
                                  R0, R1, R2, KCD, KC0, KC1, KC2, TAIL_PREC, EPS,
                                  PREFETCH)  # fmt: skip
        last = (p0 == L0 - 1) & (s0 < n_samples)
        tl.store(result + s0[:, None] * D + dd[None, :], z, mask=last[:, None])


class FusedUNetSteps(nn.Module):
    """``forward(x [B, L, d], noise [T, L, d]) -> xhat_{n+1} [B, d]`` through one kernel.

    Same function as ``FastUNetSteps`` (it reads that module's folded constants).
    ``samples_per_program``: samples one CTA runs together (larger tiles, fewer CTAs).
    """

    def __init__(
        self,
        model: T2Diff,
        precision: str = "ieee",
        samples_per_program: int = 1,
        num_warps: int = 4,
        k_chunk: int = 64,
        kernel: str = "auto",
        exact_tail: int = 5,
    ) -> None:
        super().__init__()
        if not HAVE_TRITON:
            raise RuntimeError("model.fused_tower needs triton (pip install triton)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if samples_per_program & (samples_per_program - 1):
            raise ValueError("samples_per_program must be a power of two")
        fast = FastUNetSteps(model, "gather", pad_rows=False)
        if len(fast.lengths) != 3:
            raise ValueError("the fused kernel is written for the 3-level U-Net")
        widths, dim = fast.widths, fast.dim
        for channels in (*widths, dim):
            if channels < 16 or channels & (channels - 1):
                raise ValueError(f"channel counts must be powers of two >= 16, got {channels}")
        self.precision, self.spp, self.num_warps = precision, samples_per_program, num_warps
        # What the kernel gets: PREC for steps t >= TAIL, TAIL_PREC for the last TAIL steps.
        if precision == "tf32x3tail":
            if exact_tail < 1:
                raise ValueError(f"exact_tail must be >= 1 with tf32x3tail, got {exact_tail}")
            self.step_precisions = ("tf32", min(exact_tail, fast.steps), TAIL_PRECISION)
        else:
            self.step_precisions = (precision, 0, precision)
        # Two builds of the kernel (docs/results/inference.md, "Kernel variants"):
        # "pipelined": each part's products take min(k_chunk, C) channels (fewer, larger
        #   products, each one dependent L2 round trip) and the next product's loads are
        #   issued before the current one (H100, w16, B = 1: tf32 1.95 -> 1.70 ms);
        # "uniform": the first kernel, one chunk (the smallest channel count) everywhere and
        #   no prefetch.  Its smaller tiles need fewer registers: with more programs than
        #   SMs (B = 256) it runs two CTAs per SM, where "pipelined" took 7.0 ms vs 4.1.
        # "auto" takes "pipelined" for tf32 while the programs fit on the GPU's SMs at once
        # (H100 runs G1-G2: w16 B = 1 1.93 -> 1.69 ms, w32 3.16 -> 2.72), "uniform"
        # otherwise: with tf32x3 (three products, hi/lo operand halves) the larger tiles
        # gave 2 % at w16 and cost 10 % at w32 (5.04 -> 5.57 ms); with more than 4 warps
        # "pipelined" hit an illegal memory access on the H100 (G1), not understood yet.
        # (A third build with every activation in registers / shared memory, commit 0688043,
        # was 4-6 % faster for tf32 at B = 1 only and cannot hold tf32x3's weights in shared
        # memory: removed, docs/results/inference.md "The tf32x3 tail".)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        if k_chunk < 16 or k_chunk & (k_chunk - 1):
            raise ValueError(f"k_chunk must be a power of two >= 16, got {k_chunk}")
        self.kernel = kernel
        smallest = min(*widths, dim)
        self.chunks = {
            "pipelined": {c: min(k_chunk, c) for c in (*widths, dim)},
            "uniform": {c: min(k_chunk, smallest) for c in (*widths, dim)},
        }
        self.steps, self.dim, self.drift = fast.steps, dim, fast.drift
        self.lengths, self.widths = fast.lengths, widths
        with torch.no_grad():
            self.register_buffer("w_x", fast.w_x.clone())
            self.register_buffer("b_x", fast.b_x.clone())
            self.register_buffer("skip_x_w", fast.skip_x.clone())
            self.register_buffer("skip_x_b", fast.skip_xb.clone())
            self.register_buffer("c0_bout", fast.c0_bout.clone())
            self.register_buffer("sigma", fast.sigma.clone())
            # Step t = 0 (the last) joins the loop: no ct term, plain output weight, bias
            # b_out in place of the noise term.
            ct = torch.tensor(fast.ct, dtype=torch.float32)
            ct[0] = 0.0
            self.register_buffer("ct", ct)
            out_w = fast.out_w.clone()
            out_w[0] = fast.out_w_last
            self.register_buffer("out_w", out_w.contiguous())
            self.register_buffer("out_b_last", fast.out_b_last.contiguous().clone())
            self.im_z = fast.im_z
            weights, offsets = self._pack(fast)
            self.register_buffer("weights", weights)
            # The tf32 steps read weights rounded to nearest tf32 (see the kernel's _operand);
            # only built when some step runs in tf32.
            tf32_steps = self.step_precisions[0] == "tf32"
            self.register_buffer("weights_tf32", _round_tf32_host(weights) if tf32_steps else None)
            self.register_buffer("out_w_tf32", _round_tf32_host(self.out_w) if tf32_steps else None)
        self.offsets = offsets
        self.eps = float(fast.first.eps[0])

    @staticmethod
    def _pack(fast: FastUNetSteps) -> tuple[torch.Tensor, list[int]]:
        """All block weights in one buffer; the offset of each block (first, down1, down2,
        up1, up0)."""

        def norms(spec: nn.Module) -> tuple[torch.Tensor, ...]:
            return (spec.g1, spec.be1, spec.g2, spec.be2)

        first = fast.first
        zeros = torch.zeros_like(first.b1)
        # The first block's conv1 and residual on z alone; the history's shares come per
        # sample (cond, skip_x, both with their biases).
        blocks = [
            _pack_block(fast.w_z, zeros, first.w2, first.c2, fast.skip_z, zeros, norms(first))
        ]
        for spec in (*fast.down_blocks, *fast.up_blocks):
            blocks.append(
                _pack_block(spec.w1, spec.b1, spec.w2, spec.c2, spec.ws, spec.bs, norms(spec))
            )
        offsets = [0]
        for block in blocks[:-1]:
            offsets.append(offsets[-1] + block.numel())
        return torch.cat(blocks).contiguous(), offsets

    def kernel_for(self, programs: int, device: torch.device) -> str:
        """The build that runs ``programs`` CTAs on ``device`` (see ``__init__``)."""
        if self.kernel != "auto":
            return self.kernel
        if self.precision not in ("tf32", "tf32x3tail") or self.num_warps > 4:
            return "uniform"
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            if programs > sms:
                return "uniform"
        return "pipelined"

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        steps, (l0, l1, l2), (w0, w1, w2) = self.steps, self.lengths, self.widths
        batch = x.shape[0]
        padded = math.ceil(batch / self.spp) * self.spp
        x = x.float()
        cond = torch.matmul(self.im_z(x), self.w_x) + self.b_x
        skip_x = torch.matmul(x, self.skip_x_w) + self.skip_x_b
        if padded != batch:
            fill = padded - batch
            cond = torch.cat([cond, cond.new_zeros(fill, *cond.shape[1:])])
            skip_x = torch.cat([skip_x, skip_x.new_zeros(fill, *skip_x.shape[1:])])
        noise = noise.float()
        flipped = torch.flip(noise[1:], dims=[0])  # flipped[t - 1] = noise[T - t]
        extras = self.c0_bout[1:] + self.sigma[1:] * flipped  # [T - 1, L, d], index t - 1
        last = self.out_b_last.expand(1, l0, self.dim)
        extras = torch.cat([last, extras]).contiguous()  # index t
        new = x.new_empty
        zbuf = new(padded, l0, self.dim)
        # One scratch buffer per level: a buffer shared by levels would have a different
        # per-sample stride in each, and CTAs at different levels would overwrite each
        # other's samples (seen on the H100 at B = 64 and 256 before this split).
        tmp0, tmp1, tmp2 = new(padded, l0, w0), new(padded, l1, w1), new(padded, l2, w2)
        h0, d1, d2, u1 = (
            new(padded, l0, w0),
            new(padded, l1, w1),
            new(padded, l2, w2),
            new(padded, l1, w1),
        )
        result = new(batch, self.dim)
        first, down1, down2, up1, up0 = self.offsets
        kernel = self.kernel_for(padded // self.spp, x.device)
        chunks = self.chunks[kernel]
        precision, tail, tail_precision = self.step_precisions
        # The steps in tf32 read the weights rounded to nearest tf32, the tail the float32 ones.
        weights, out_w = (
            (self.weights_tf32, self.out_w_tf32) if precision == "tf32"
            else (self.weights, self.out_w)
        )  # fmt: skip
        _reverse_kernel[(padded // self.spp,)](
            weights, cond.contiguous(), skip_x.contiguous(), noise[0].contiguous(), extras,
            self.ct, out_w, self.weights, self.out_w, result,
            zbuf, tmp0, tmp1, tmp2, h0, d1, d2, u1, batch,
            FIRST=first, DOWN1=down1, DOWN2=down2, UP1=up1, UP0=up0,
            L0=l0, L1=l1, L2=l2,
            BL0=_rows_block(l0), BL1=_rows_block(l1), BL2=_rows_block(l2),
            W0=w0, W1=w1, W2=w2, D=self.dim, T=steps, SPP=self.spp,
            KCD=chunks[self.dim], KC0=chunks[w0], KC1=chunks[w1], KC2=chunks[w2],
            PREC=precision, EPS=self.eps, PREFETCH=kernel == "pipelined",
            TAIL=tail, TAIL_PREC=tail_precision,
            num_warps=self.num_warps, num_stages=1,
        )  # fmt: skip
        return result + x[:, l0 - 1] if self.drift else result


class FusedTower(nn.Module):
    """``forward(item_seq, time_lag, noise) -> user_embedding`` with the fused diffusion."""

    def __init__(self, model: T2Diff, **kernel_options: object) -> None:
        super().__init__()
        if not model.config.use_diffusion:
            raise ValueError("a tower without diffusion has nothing to fuse")
        self.model = model.eval()
        self.steps = FusedUNetSteps(model, **kernel_options)  # type: ignore[arg-type]

    def forward(
        self, item_seq: torch.Tensor, time_lag: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        batch = Batch(item_seq, time_lag)
        x = self.model.item_emb(item_seq)
        # the diffusion reads the newest diffusion_length behaviours (all by default)
        user = self.model._tower(batch, x, self.steps(self.model.diffusion_window(x), noise))
        return keep_contract_inputs(user, batch, noise)

    def user_embedding(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        """The evaluator's contract (``model.harness.evaluate``)."""
        return self.forward(batch.item_seq, batch.time_lag, noise)
