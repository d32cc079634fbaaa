"""Train and evaluate several models as parallel processes on one machine (one GPU).

Small recommenders leave most of an H100 idle, so the model-quality table trains every
(model, seed) pair at once: ``python bench/parallel_train.py --data DATA --out DIR
--max-minutes 7 t2diff:0 t2diff:1 sasrec:0 mixed_attention:0 --set t2diff:unet_width=32``.
Each job runs ``t2diff train`` then ``t2diff evaluate``; logs go to ``DIR/NAME.log``; at the
end ``DIR/summary.csv`` holds every run's test metrics (one row per run) and, with
``--tar``, everything but checkpoints is packed into one archive.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.metrics import REPORTED_METRICS as METRICS  # noqa: E402


def _finished(run_dir: Path) -> bool:
    """The run stopped early (validation stopped improving) and has its metrics."""
    meta_path, metrics_path = run_dir / "run.json", run_dir / "metrics.json"
    if not (meta_path.is_file() and metrics_path.is_file()):
        return False
    return bool(json.loads(meta_path.read_text()).get("stopped_early"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--format",
        default="auto",
        help="auto | csv | tsv | parquet | ml-1m | ml-100k (auto: by name, then by suffix)",
    )
    parser.add_argument("--max-minutes", type=float, default=7.0)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="MODEL_OR_JOB:key=value, applied to jobs of that model or name",
    )
    parser.add_argument("--tar", type=Path, default=None)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="put checkpoint.pt in the --tar too"
    )
    parser.add_argument("jobs", nargs="+", help="model:seed or name=model:seed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    processes = []
    for job in args.jobs:
        name, _, spec = job.rpartition("=")
        model, _, seed = spec.partition(":")
        name = name or f"{model}_s{seed}"
        sets = [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] in (model, name)]
        run_dir = args.out / name
        train = [
            sys.executable,
            "-m",
            "t2diff_cli.main",
            "train",
            "--data",
            args.data,
            "--format",
            args.format,
            "--out",
            str(run_dir),
            "--model",
            model,
            "--seed",
            seed or "0",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--patience",
            str(args.patience),
            "--device",
            args.device,
            "--max-minutes",
            str(args.max_minutes),
            "--no-progress",
        ]
        train += [f"--{flag}" for flag in ("amp", "compile", "resume") if getattr(args, flag)]
        for pair in sets:
            train += ["--set", pair]
        evaluate = [
            sys.executable,
            "-m",
            "t2diff_cli.main",
            "evaluate",
            "--run",
            str(run_dir),
            "--device",
            args.device,
        ]
        script = " ".join(f"'{a}'" for a in train) + " && " + " ".join(f"'{a}'" for a in evaluate)
        if args.resume and _finished(run_dir):
            # Stopped early in an earlier call and evaluated: nothing left to do (its
            # checkpoint may not even have been brought back).
            script = f"echo '{name}: stopped early before, kept as it is'"
        log = open(args.out / f"{name}.log", "w")  # noqa: SIM115 - closed after wait
        processes.append(
            (
                name,
                model,
                seed,
                run_dir,
                log,
                subprocess.Popen(
                    ["bash", "-c", script],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=os.environ.copy(),
                ),
            )
        )
        time.sleep(1)
    rows = []
    for name, model, seed, run_dir, log, process in processes:
        code = process.wait()
        log.close()
        metrics_path = run_dir / "metrics.json"
        if code != 0 or not metrics_path.is_file():
            print(f"{name}: FAILED (exit {code}), see {log.name}")
            continue
        metrics = json.loads(metrics_path.read_text())
        meta = json.loads((run_dir / "run.json").read_text())
        test = metrics[metrics["model_name"]]["test"]
        valid = metrics[metrics["model_name"]]["valid"]
        row = {
            "name": name,
            "model": model,
            "seed": seed,
            "best_epoch": meta.get("best_epoch"),
            "epochs_run": meta.get("epochs_run"),
            "stopped_early": meta.get("stopped_early"),
            "valid_ndcg@10": valid["ndcg@10"],
            **{m: test[m] for m in METRICS},
        }
        rows.append(row)
        print(json.dumps(row))
    if rows:
        with open(args.out / "summary.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.tar:
        with tarfile.open(args.tar, "w:gz") as tar:
            tar.add(
                args.out,
                arcname=args.out.name,
                filter=lambda info: (
                    None
                    if info.name.endswith("checkpoint.pt") and not args.keep_checkpoints
                    else info
                ),
            )
    return 0 if len(rows) == len(processes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
