"""Comparisons of float32 results with tolerances that follow float32 arithmetic.

Two float32 computations of the same value (another summation order, a fused kernel, a
batch of one instead of three, another CPU's SIMD width) differ by a few units in the last
place of the magnitudes involved: ``eps * |value| * (a small factor growing with depth)``,
where ``eps = 2**-23 ~ 1.2e-7``.  A bare absolute bound (``< 1e-6``) is therefore a
statement about one machine's rounding on one model's magnitudes: a value near 1.4 already
has a last-place unit of 1.2e-7, and eleven of those broke a 1e-6 bound on an Intel Xeon.
These helpers bound the difference *relative to the magnitude of the values compared*.
"""

from __future__ import annotations

from typing import Any

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)
# Same arithmetic, another order (batching, blocking, SIMD width): ~80 ulps of the largest
# magnitude, far above what reordering produces, far below any real defect.
RTOL_REORDER = 1e-5
# Another formulation of the same function (convolution as matmul, folded biases, ONNX
# Runtime against eager PyTorch) over several diffusion steps.
RTOL_REFORMULATION = 1e-4


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_diff(actual: Any, expected: Any) -> float:
    return float(np.max(np.abs(_array(actual) - _array(expected)), initial=0.0))


def assert_f32_close(
    actual: Any, expected: Any, rtol: float = RTOL_REORDER, scale: Any = None
) -> None:
    """``max|actual - expected| <= rtol * magnitude``, where the magnitude is the largest
    absolute value of ``scale`` (default: of both operands), the size the float32 rounding
    of these numbers is proportional to."""
    a, e = _array(actual), _array(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    magnitude = float(
        np.max(np.abs(_array(scale)), initial=0.0)
        if scale is not None
        else max(np.max(np.abs(a), initial=0.0), np.max(np.abs(e), initial=0.0))
    )
    diff = max_abs_diff(a, e)
    bound = rtol * magnitude
    assert diff <= bound, (
        f"max |difference| {diff:.3g} > {rtol:g} x magnitude {magnitude:.3g} = {bound:.3g} "
        f"({diff / max(magnitude, np.finfo(np.float64).tiny) / F32_EPS:.1f} float32 ulps)"
    )
