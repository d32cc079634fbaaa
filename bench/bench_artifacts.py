"""Time exported user towers exactly as the service runs them (any model: T2Diff, DimeRec, ...).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_artifacts.py artifacts/A artifacts/B \\
        --batches 1,8,64 --runs 100 --csv docs/results/raw/artifacts_bench.csv

Each export is loaded by ``service.tower.UserTowerRunner`` (the serving code, its ORT
settings and its fixed noise), fed full-length random histories of the export's own items,
and timed per call after a warm-up; the exports are interleaved call by call (alternating
their order), so a noisy neighbour slows all of them alike and their ratios hold.  Prints
p50/p95/p99 per call, samples/s (from the p50), the median thread CPU time per call and
the machine's load average.  The CPU time is what the call costs when its core is not
taken away: the runner's one-thread session computes on the calling thread (the
yardstick's session keeps its own default of 2 intra-op threads, so its CPU time is not
comparable).

``--yardstick ../shared/bench/tower_yardstick.py`` adds the yardstick's ONNX Runtime tower
(``--yardstick-widths``, d = 64, T = 50) to the same run: timed right after the exports at
each batch size, the yardsticks interleaved with each other.  ``--eager`` adds PyTorch eager
on each export's own checkpoint (``user_tower.pt``), likewise in a block of its own.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contracts.manifest import ArtifactError  # noqa: E402
from contracts.tower import make_noise  # noqa: E402
from service.tower import UserTowerRunner  # noqa: E402

HEADER = ["machine", "artifacts", "model", "steps", "batch", "p50_ms", "p95_ms", "p99_ms",
          "samples_per_s", "loadavg_1m", "cpu_p50_ms"]  # fmt: skip


@dataclass
class Timed:
    """One thing timed in the interleaved loop: ``prepare(batch)`` returns its call."""

    name: str
    model: str
    steps: object
    prepare: Callable[[int], Callable[[], object]]
    group: str = "export"  # timed interleaved with the entries of its own group only


def export_entry(path: Path, rng: np.random.Generator) -> Timed:
    """An export as the service runs it: ``UserTowerRunner`` on random full histories."""
    runner = UserTowerRunner(path)

    def prepare(batch: int) -> Callable[[], object]:
        tokens = rng.integers(1, runner.num_items + 1, (batch, runner.max_seq_len)).tolist()
        stamps = np.sort(rng.uniform(0, 1e6, (batch, runner.max_seq_len)), axis=1).tolist()
        return lambda: runner.embed_tokens(tokens, stamps, 1e6)

    return Timed(path.name, runner.model_name, runner.manifest.raw.get("diffusion_steps"), prepare)


def eager_entry(path: Path, rng: np.random.Generator) -> Timed:
    """PyTorch eager on the export's own checkpoint (``user_tower.pt``): the reference the
    issue's "x eager at batch 64" target is measured against (torch's default threads)."""
    import torch  # only here: the serving path never imports it

    from model.base import Batch
    from worker.tower import load_checkpoint

    manifest, model = load_checkpoint(path)
    noise = torch.from_numpy(make_noise(manifest["noise_shape"], manifest["noise_seed"]))
    length, n_items = int(manifest["max_seq_len"]), int(manifest["num_items"])

    def prepare(batch: int) -> Callable[[], object]:
        item_seq = torch.from_numpy(rng.integers(1, n_items + 1, (batch, length)))
        time_lag = torch.from_numpy(rng.uniform(0, 1e5, (batch, length)).astype(np.float32))

        def call() -> object:
            with torch.inference_mode():
                return model.user_embedding(Batch(item_seq, time_lag), noise)

        return call

    steps = manifest.get("diffusion_steps")
    return Timed(f"{path.name}-eager", f"{manifest['model_name']}-eager", steps, prepare, "eager")


def yardstick_entries(path: Path, widths: list[int], seed: int, workdir: Path) -> list[Timed]:
    """``../shared/bench/tower_yardstick.py`` on ONNX Runtime as it runs itself (its own
    export and session options; d = 64, T = 50), at each width: the same yardstick as
    ``bench_tower.py``'s ``yardstick_ort`` rows, here in the same run as the
    exports, so the ratio holds however fast the host is that day."""
    from bench.bench_tower import load_yardstick, yardstick_backends  # torch: only here
    from model.t2diff import T2DiffConfig

    module = load_yardstick(path)
    if module is None:
        raise SystemExit(f"no yardstick at {path}")
    entries = []
    for width in widths:
        config = T2DiffConfig(dim=64, unet_width=width, diffusion_steps=50)
        backend = yardstick_backends(module, f"w{width}", config, workdir, seed)[-1]

        def prepare(batch: int, backend=backend, length=config.max_seq_len) -> Callable[[], object]:  # type: ignore[no-untyped-def]
            item_seq = np.zeros((batch, length), dtype=np.int64)
            return backend.prepare(item_seq, item_seq.astype(np.float32))

        entries.append(
            Timed(backend.name, "yardstick", config.diffusion_steps, prepare, "yardstick")
        )
    return entries


def time_interleaved(group: list[Timed], batch: int, args: argparse.Namespace) -> list[list]:
    """Time ``group``'s calls at ``batch``, call by call in alternating order; one row each."""
    runs = max(5, args.runs // batch)
    calls = [entry.prepare(batch) for entry in group]
    for call in calls:
        for _ in range(args.warmup):
            call()
    times: list[list[float]] = [[] for _ in group]
    cpu: list[list[float]] = [[] for _ in group]
    load = os.getloadavg()[0]
    slots = list(range(len(group)))
    for index in range(runs):
        # alternate the order: nothing always runs right after the same neighbour
        for slot in slots if index % 2 == 0 else slots[::-1]:
            started, cpu_started = time.perf_counter(), time.thread_time()
            calls[slot]()
            cpu[slot].append((time.thread_time() - cpu_started) * 1000)
            times[slot].append((time.perf_counter() - started) * 1000)
    rows = []
    for entry, sample, cpu_sample in zip(group, times, cpu, strict=True):
        p50, p95, p99 = np.percentile(sample, [50, 95, 99])
        row = [args.machine, entry.name, entry.model, entry.steps, batch, f"{p50:.3f}",
               f"{p95:.3f}", f"{p99:.3f}", f"{batch / p50 * 1000:.1f}", f"{load:.2f}",
               f"{float(np.median(cpu_sample)):.3f}"]  # fmt: skip
        rows.append(row)
        print(dict(zip(HEADER, row, strict=True)), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", nargs="+", type=Path, help="export directories")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--runs", type=int, default=100, help="timed calls at batch 1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--machine", default="cpu-2core")
    parser.add_argument("--csv", type=Path, default=None, help="write the rows here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--yardstick", type=Path, default=None,
        help="time tower_yardstick.py's ONNX Runtime tower in the same loop (needs torch)",
    )  # fmt: skip
    parser.add_argument("--yardstick-widths", default="32", help="comma list")
    parser.add_argument(
        "--eager", action="store_true",
        help="also PyTorch eager on each export's user_tower.pt (needs torch)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    entries = [export_entry(path, rng) for path in args.artifacts]
    for path in args.artifacts if args.eager else ():
        try:
            entries.append(eager_entry(path, rng))
        except ArtifactError as exc:  # an export made before exports carried user_tower.pt
            print(f"no eager row for {path.name}: {exc}", flush=True)
    if args.yardstick is not None:
        widths = [int(w) for w in args.yardstick_widths.split(",") if w]
        with tempfile.TemporaryDirectory(prefix="t2diff-yardstick-") as workdir:
            entries += yardstick_entries(args.yardstick, widths, args.seed, Path(workdir))
    # The exports interleave with each other, eager and the yardsticks each among their
    # own, in blocks per batch size: the yardstick's session keeps ORT's default thread
    # pool (2 threads that spin after each call) and eager torch's 2 threads, either of
    # which would take the second core from a one-thread export timed right after it.
    groups = [[e for e in entries if e.group == g] for g in ("export", "eager", "yardstick")]
    rows = []
    for batch in [int(b) for b in args.batches.split(",") if b]:
        for group in (g for g in groups if g):
            rows += time_interleaved(group, batch, args)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
