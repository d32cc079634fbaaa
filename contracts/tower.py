"""The user-tower ONNX contract: input/output names, layout and noise.

A user-tower export (``t2diff export``) is one ONNX graph with these inputs:

* ``item_seq``  int64 ``[B, L]``: item tokens, token = row of ``item_embeddings.npy`` + 1,
  0 = padding; sequences are LEFT-padded so the newest behaviour is the last column.
* ``time_lag``  float32 ``[B, L]``: seconds between the request time and each behaviour
  (0 at padding); the graph applies its own transform (``log1p``).
* ``noise``     float32 of ``manifest["noise_shape"]``: the Gaussian noise of the reverse
  diffusion (``z_T`` and one draw per step), shared by every row of the batch.  Passing the
  same noise gives the same embedding, so a request is reproducible; the service draws it
  once from ``manifest["noise_seed"]``.

and one output ``user_embedding`` float32 ``[B, d]``, scored against the item embeddings by
inner product.

A diffusion tower (T2Diff) may also be exported as two graphs (manifest field
``tower_parts``, file names in ``contracts.manifest``), whose composition is the graph above:

* ``diffusion`` (``PART_DIFFUSION``): inputs ``item_seq`` and ``noise``, output ``xhat``
  float32 ``[B, d]``, the reconstructed next item of the reverse process.  It reads no time
  lag, so for one model version (one fixed noise) ``xhat`` is a function of the padded
  ``item_seq`` row alone and may be cached under it.
* ``attention`` (``PART_ATTENTION``): inputs ``item_seq``, ``time_lag`` and ``xhat``,
  output ``user_embedding``: the session and time-lag attention, cheap, run per request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INPUT_ITEM_SEQ = "item_seq"
INPUT_TIME_LAG = "time_lag"
INPUT_NOISE = "noise"
OUTPUT_USER_EMBEDDING = "user_embedding"
# The split tower: the diffusion part's output is the attention part's input.
XHAT = "xhat"
PART_DIFFUSION = "diffusion"
PART_ATTENTION = "attention"
PADDING_TOKEN = 0


def make_noise(shape: Sequence[int], seed: int) -> np.ndarray:
    """The reverse-process noise for ``seed``: identical on every machine and run."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def pad_batch(
    token_lists: Sequence[Sequence[int]],
    timestamp_lists: Sequence[Sequence[float]],
    now: Sequence[float] | float,
    max_seq_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token sequences (oldest first) into the tower's ``item_seq``/``time_lag``.

    Only the newest ``max_seq_len`` behaviours are kept.  ``now`` is the request time (one
    per row or one for all); lags are clipped at 0 so a clock skew never gives a negative.
    """
    batch = len(token_lists)
    item_seq = np.zeros((batch, max_seq_len), dtype=np.int64)
    time_lag = np.zeros((batch, max_seq_len), dtype=np.float32)
    nows = np.broadcast_to(np.asarray(now, dtype=np.float64), (batch,))
    for row, (tokens, stamps) in enumerate(zip(token_lists, timestamp_lists, strict=True)):
        tokens = list(tokens)[-max_seq_len:]
        stamps = list(stamps)[-max_seq_len:]
        if not tokens:
            continue
        item_seq[row, -len(tokens) :] = tokens
        time_lag[row, -len(tokens) :] = np.maximum(nows[row] - np.asarray(stamps, np.float64), 0)
    return item_seq, time_lag
