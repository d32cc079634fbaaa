"""How much of a trained diffusion model's quality the reverse-process noise costs, no retraining.

``python bench/sampler_noise.py runs/NAME [--split valid] [--device cuda]``: the run's model
(DimeRec or T2Diff) evaluated by the harness (full ranking, seen items excluded, the fixed
evaluation noise) with the reverse step's noise as DDPM's standard deviation (``std``), as the
posterior variance (``variance``: DimeRec's Algorithm 2, the T2Diff authors' code) and without
noise (``none``); for DimeRec also its own GEM ranked by the best of its K interests. Only
``sigma_mode`` changes between rows; training never reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.dimerec import DimeRec  # noqa: E402
from model.harness import DeviceSequences, evaluate  # noqa: E402
from model.schedule import NoiseSchedule  # noqa: E402
from model.train import load_run  # noqa: E402

SHOWN = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run = load_run(args.run, args.device)
    model = run.model
    if not isinstance(getattr(model, "schedule", None), NoiseSchedule):
        raise SystemExit(f"{args.run}: {run.meta['model_name']} has no reverse process")
    config = model.config
    sequences = DeviceSequences.from_data(run.data, args.device)
    targets = getattr(run.split, f"{args.split}_targets")
    print(f"| {args.run.name} ({args.split}) | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---|" * len(SHOWN))
    with torch.no_grad():
        for mode in ("std", "variance", "none"):
            model.schedule = NoiseSchedule.create(
                config.schedule,  # type: ignore[arg-type]
                config.diffusion_steps,
                config.schedule_a,
                config.schedule_b,
                mode,  # type: ignore[arg-type]
            )
            metrics = evaluate(model, sequences, targets, config.max_seq_len)
            print(f"| sigma_mode={mode} | " + " | ".join(f"{metrics[m]:.4f}" for m in SHOWN) + " |")
        if not isinstance(model, DimeRec) or model.dam is None:
            return
        # The GEM alone, as ComiRec-SA is evaluated: each item's best score over K interests.
        model.dam, dam = None, model.dam
        metrics = evaluate(model, sequences, targets, config.max_seq_len)
        model.dam = dam
        print("| GEM, max over K | " + " | ".join(f"{metrics[m]:.4f}" for m in SHOWN) + " |")


if __name__ == "__main__":
    main()
