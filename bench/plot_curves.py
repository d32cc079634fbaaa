"""Validation NDCG@10 per epoch for the runs in docs/results/raw/histories/ (one line per
run, one colour per model): ``python bench/plot_curves.py OUT.png``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Runs that a longer run of the same model replaces (run 6 resumed run 5's T2Diff seeds).
SUPERSEDED = {("ml1m", "t2diff"), ("ml1m", "t2diff_no_dp"), ("ml1m2", "t2diff")}
PALETTE = plt.get_cmap("tab20")
HISTORIES = Path(__file__).resolve().parents[1] / "docs" / "results" / "raw" / "histories"


def main(out: str) -> None:
    figure, axis = plt.subplots(figsize=(8, 5))
    colours: dict[str, tuple[float, ...]] = {}
    for path in sorted(HISTORIES.glob("*.json")):
        run, _, name = path.stem.partition("_")
        model = name.rsplit("_s", 1)[0]
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
    axis.set_title("ML-1M, leave-one-out, H100, same harness (one line per seed)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
