"""Validation NDCG@10 per epoch for the runs in docs/results/raw/histories/ (one line per
run, one colour per model): ``python bench/plot_curves.py OUT.png``; ``--histories DIR
--match GLOB --title TEXT`` plot another set (e.g. issue 16's round 2)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Runs that a longer run of the same model replaces (run 6 resumed run 5's T2Diff seeds).
SUPERSEDED = {("ml1m", "t2diff"), ("ml1m", "t2diff_no_dp"), ("ml1m2", "t2diff")}
PALETTE = plt.get_cmap("tab20")
HISTORIES = Path(__file__).resolve().parents[1] / "docs" / "results" / "raw" / "histories"


def main(out: str, histories: Path, matches: list[str], title: str) -> None:
    figure, axis = plt.subplots(figsize=(8, 5))
    colours: dict[str, tuple[float, ...]] = {}
    for path in sorted({p for match in matches for p in histories.glob(match)}):
        run, _, name = path.stem.partition("_")
        model = re.sub(r"_s\d+$", "", name)  # one colour for a model's seeds
        if (run, model) in SUPERSEDED:
            continue
        history = json.loads(path.read_text())
        epochs = [row["epoch"] for row in history]
        values = [row["valid_ndcg@10"] for row in history]
        label = None if model in colours else model
        # tab20 has a colour for every model of the table; DimeRec's family is dashed.
        colour = colours.setdefault(model, PALETTE(len(colours) % 20))
        style = "--" if model.startswith(("dimerec", "comirec")) else "-"
        axis.plot(epochs, values, color=colour, label=label, lw=1.2, ls=style)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation NDCG@10 (full ranking)")
    axis.set_title(title)
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--histories", type=Path, default=HISTORIES)
    parser.add_argument("--match", action="append", help="glob (repeatable); all runs by default")
    parser.add_argument(
        "--title", default="ML-1M, leave-one-out, H100, same harness (one line per seed)"
    )
    args = parser.parse_args()
    main(args.out, args.histories, args.match or ["*.json"], args.title)
