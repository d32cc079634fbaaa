"""Ranking metrics from 0-based ranks of the single held-out target (leave-one-out).

With one relevant item per user, Recall@K equals HR@K.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# The paper's ML-1M cut-offs (Recall/MRR at 2 and 20) and DimeRec's (HR/NDCG at 10/20/50).
DEFAULT_CUTOFFS = (2, 10, 20, 50)
# The metrics the results tables report: the paper's Recall/MRR@{2,20}, DimeRec's HR/NDCG.
REPORTED_METRICS = (
    "recall@2",
    "recall@20",
    "mrr@2",
    "mrr@20",
    "hr@10",
    "hr@20",
    "hr@50",
    "ndcg@10",
    "ndcg@20",
    "ndcg@50",
)


def metrics_from_ranks(ranks: np.ndarray, cutoffs: Iterable[int] = DEFAULT_CUTOFFS) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in cutoffs:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"hr@{k}"] = out[f"recall@{k}"]
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["n_users"] = int(len(ranks))
    return out
