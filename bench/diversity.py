"""DimeRec's diversity figure: distinct genres among each user's top-100 on ML-1M.

    python bench/diversity.py --movies ../shared/data/ml-1m/movies.dat runs/A runs/B ...

For every user's test position, the run's model ranks all items (seen items excluded, the
harness's fixed noise), keeps the top 100 and counts the distinct genres of those movies
(``movies.dat``: ``MovieID::Title::Genre|Genre``); prints the mean and std over users per
run (the DimeRec paper reports this for its multi-interest diversity claim).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.harness import DeviceSequences  # noqa: E402
from model.train import load_run  # noqa: E402

TOP = 100


def read_genres(movies: Path) -> dict[str, set[str]]:
    genres: dict[str, set[str]] = {}
    for line in movies.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            movie_id, _title, tags = line.strip().split("::")
            genres[movie_id] = set(tags.split("|"))
    return genres


@torch.no_grad()
def distinct_genres(
    run_dir: Path, genres: dict[str, set[str]], batch_size: int = 256
) -> np.ndarray:
    run = load_run(run_dir, "cpu")
    max_len = int(run.meta["model_config"]["max_seq_len"])
    sequences = DeviceSequences.from_data(run.data, "cpu")
    noise = torch.randn(run.model.noise_shape, generator=torch.Generator().manual_seed(0))
    item_ids = [str(i) for i in run.data.item_ids]
    counts: list[int] = []
    targets = torch.as_tensor(run.split.test_targets)
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        scores = run.model.full_sort_scores(sequences.batch(chunk, max_len), noise).float()
        scores[:, 0] = -torch.inf
        scores.scatter_(1, sequences.seen_items(chunk), -torch.inf)
        for row in scores.topk(TOP, dim=1).indices.numpy():
            counts.append(len(set().union(*(genres.get(item_ids[t - 1], set()) for t in row))))
    return np.asarray(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--movies", type=Path, default=Path("../shared/data/ml-1m/movies.dat"))
    args = parser.parse_args(argv)
    genres = read_genres(args.movies)
    print(f"| run | model | distinct genres in top {TOP} (mean ± std over users) |")
    print("|---|---|---|")
    for run_dir in args.runs:
        counts = distinct_genres(run_dir, genres)
        name = load_run(run_dir, "cpu").meta["model_name"]
        print(f"| {run_dir.name} | {name} | {counts.mean():.2f} ± {counts.std():.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
