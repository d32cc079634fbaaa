"""Aggregate ``bench/parallel_train.py`` summaries into the model-quality table.

``python bench/aggregate_quality.py docs/results/raw/ml1m_run*_summary.csv
--drop run1:t2diff,run1:t2diff_no_dp --csv docs/results/model-quality.csv``: one row per
(model, metric) with mean, std over seeds and the seed count; ``--drop run:model`` leaves
out a run's rows that a later, longer run of the same model replaces; ``--rename
run:variant=label`` files a run's rows under another label (a default that changed since).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.metrics import REPORTED_METRICS as METRICS  # noqa: E402

ORDER = [
    "t2diff",
    "mixed_attention",
    "t2diff_no_dp",
    "t2diff_linear",
    "t2diff_log",
    "t2diff_T10",
    "t2diff_T200",
    "sasrec",
    "gru4rec",
    "two_tower",
    "t2diff_w16",
    "t2diff_gap3600",
    "mixed_attention_gap3600",
    "dimerec",
    "comirec_sa",
    "dimerec_no_gem",
    "dimerec_no_recon",
    "dimerec_no_ssm",
    "dimerec_no_grw",
    "dimerec_sigma_none",
    "dimerec_sigma_none_mu5",
    "dimerec_std",
    "dimerec_std_lr2e-3",
    "dimerec_std_lr2e-3_no_gem",
    "dimerec_std_lr2e-3_no_recon",
    "dimerec_std_lr2e-3_no_ssm",
    "dimerec_std_lr2e-3_no_grw",
    "popularity",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--drop", default="")
    parser.add_argument("--rename", default="", help="run:variant=label,...")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--append", action="store_true", help="add rows (another dataset)")
    args = parser.parse_args()
    dropped = {tuple(item.split(":")) for item in args.drop.split(",") if item}
    renamed: dict[tuple[str, ...], str] = {}
    for item in filter(None, args.rename.split(",")):
        key, _, label = item.partition("=")
        if not re.fullmatch(r"run\d+:[^:=]+", key) or not label:
            parser.error(f"--rename {item!r}: expected run<N>:variant=label")
        renamed[tuple(key.split(":"))] = label
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.summaries:
        run = re.search(r"(run\d+)", path.name).group(1)  # type: ignore[union-attr]
        with open(path) as handle:
            for row in csv.DictReader(handle):
                # A named job (``t2diff_w16_s0=t2diff:0``) is its own variant: group by the
                # job name without its seed suffix, which is the model name otherwise.
                variant = row["name"].rsplit("_s", 1)[0]
                if (run, variant) in dropped:
                    continue
                variant = renamed.get((run, variant), variant)
                for metric in METRICS:
                    values[variant][metric].append(float(row[metric]))
    models = sorted(values, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    with open(args.csv, "a" if args.append else "w", newline="") as handle:
        writer = csv.writer(handle)
        if not args.append:
            writer.writerow(["dataset", "model", "metric", "mean", "std", "n_seeds"])
        for model in models:
            for metric in METRICS:
                sample = np.asarray(values[model][metric])
                std = float(sample.std(ddof=1)) if len(sample) > 1 else 0.0
                writer.writerow(
                    [args.dataset, model, metric, f"{sample.mean():.5f}", f"{std:.5f}", len(sample)]
                )
    shown = ["recall@20", "mrr@20", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "recall@2", "mrr@2"]
    print("| model | n | " + " | ".join(shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for model in models:
        cells = []
        for metric in shown:
            sample = np.asarray(values[model][metric])
            std = sample.std(ddof=1) if len(sample) > 1 else 0.0
            cells.append(f"{sample.mean():.4f} ± {std:.4f}")
        print(f"| {model} | {len(values[model]['hr@10'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
