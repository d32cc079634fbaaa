"""Time exported user towers exactly as the service runs them (any model: T2Diff, DimeRec, ...).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_artifacts.py artifacts/A artifacts/B \\
        --batches 1,8,64 --runs 100 --csv docs/results/raw/artifacts_bench.csv

Each export is loaded by ``service.tower.UserTowerRunner`` (the serving code, its ORT
settings and its fixed noise), fed full-length random histories of the export's own items,
and timed per call after a warm-up; the exports are interleaved call by call (alternating
their order), so a noisy neighbour slows all of them alike and their ratios hold.  Prints
p50/p95/p99 per call, samples/s (from the p50), the median thread CPU time per call and
the machine's load average.  The CPU time is what the call costs when its core is not
taken away: the runner's one-thread session computes on the calling thread.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.tower import UserTowerRunner  # noqa: E402

HEADER = ["machine", "artifacts", "model", "steps", "batch", "p50_ms", "p95_ms", "p99_ms",
          "samples_per_s", "loadavg_1m", "cpu_p50_ms"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", nargs="+", type=Path, help="export directories")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--runs", type=int, default=100, help="timed calls at batch 1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--machine", default="cpu-2core")
    parser.add_argument("--csv", type=Path, default=None, help="write the rows here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runners = [(path, UserTowerRunner(path)) for path in args.artifacts]
    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in [int(b) for b in args.batches.split(",") if b]:
        runs = max(5, args.runs // batch)
        inputs = []
        for _, runner in runners:
            tokens = rng.integers(1, runner.num_items + 1, (batch, runner.max_seq_len))
            stamps = np.sort(rng.uniform(0, 1e6, (batch, runner.max_seq_len)), axis=1)
            inputs.append((tokens.tolist(), stamps.tolist()))
        for (_, runner), (tokens, stamps) in zip(runners, inputs, strict=True):
            for _ in range(args.warmup):
                runner.embed_tokens(tokens, stamps, 1e6)
        times: list[list[float]] = [[] for _ in runners]
        cpu: list[list[float]] = [[] for _ in runners]
        load = os.getloadavg()[0]
        slots = list(range(len(runners)))
        for call in range(runs):
            # alternate the order: no export always runs right after the same neighbour
            for slot in slots if call % 2 == 0 else slots[::-1]:
                runner = runners[slot][1]
                tokens, stamps = inputs[slot]
                started, cpu_started = time.perf_counter(), time.thread_time()
                runner.embed_tokens(tokens, stamps, 1e6)
                cpu[slot].append((time.thread_time() - cpu_started) * 1000)
                times[slot].append((time.perf_counter() - started) * 1000)
        for (path, runner), sample, cpu_sample in zip(runners, times, cpu, strict=True):
            p50, p95, p99 = np.percentile(sample, [50, 95, 99])
            row = [args.machine, path.name, runner.model_name, runner.manifest.get(
                "diffusion_steps"), batch, f"{p50:.3f}", f"{p95:.3f}", f"{p99:.3f}",
                f"{batch / p50 * 1000:.1f}", f"{load:.2f}",
                f"{float(np.median(cpu_sample)):.3f}"]  # fmt: skip
            rows.append(row)
            print(dict(zip(HEADER, row, strict=True)), flush=True)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
