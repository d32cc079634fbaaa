"""A short-history data set cut from a long one, to judge models on short sequences.

The data kept from us (Amazon-review categories) has a median of about 6 interactions per
user; ML-1M's median is 96.  This keeps each user's *first* ``n`` interactions, ``n`` drawn
uniformly from ``--min-len..--max-len`` per user (seeded), so the leave-one-out split
predicts the 4th..14th item from 2..12 earlier ones:

    python bench/short_history.py --data ../shared/data/ml-1m/sequences.tsv \\
        --out /tmp/ml1m-short.tsv

The output is ``user_id<TAB>item_id<TAB>timestamp`` (position as the time for ML-1M),
which ``t2diff train --format tsv`` and ``bench/parallel_train.py --format tsv`` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.data import load_interactions  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--min-len", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 3 <= args.min_len <= args.max_len:
        parser.error("need 3 <= --min-len <= --max-len (leave-one-out needs 3 per user)")
    frame = load_interactions(args.data, args.format)
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    users = frame["user_id"].unique()
    rng = np.random.default_rng(args.seed)
    keep_len = dict(
        zip(users, rng.integers(args.min_len, args.max_len + 1, len(users)), strict=True)
    )
    rank = frame.groupby("user_id", sort=False).cumcount()
    kept = frame[rank.to_numpy() < frame["user_id"].map(keep_len).to_numpy()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept.to_csv(args.out, sep="\t", index=False)
    lengths = kept.groupby("user_id").size()
    print(
        f"{args.out}: {len(kept)} interactions, {len(lengths)} users, "
        f"{kept['item_id'].nunique()} items, median length {int(lengths.median())}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
