"""Per-part cost of the split T2Diff tower as the service runs it (one ORT thread).

    OMP_WAIT_POLICY=PASSIVE flock /tmp/t2diff-cpu-timing.lock \\
        python bench/bench_split_tower.py artifacts/ml1m-t2diff_w16_s2-split --batches 1,4,16

For each export with ``tower_parts``: the single graph, the ``diffusion`` part, the
``attention`` part, and ``UserTowerRunner.embed_tokens`` with every row a cache miss and
with every row a hit (padding, key hashing and the LRU included), on full-length random
histories of the export's items; the variants are interleaved call by call so a neighbour
slows all alike.  Prints p50/p99 ms per call and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contracts.tower import pad_batch  # noqa: E402
from service.tower import UserTowerRunner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--runs", type=int, default=200, help="timed calls per variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"loadavg before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for path in args.artifacts:
        plain = UserTowerRunner(path)
        cached = UserTowerRunner(path, xhat_cache_size=1_000_000)
        assert plain.diffusion_session is not None and plain.attention_session is not None
        length = plain.max_seq_len
        for batch in [int(b) for b in args.batches.split(",") if b]:
            tokens = rng.integers(1, plain.num_items + 1, (batch, length)).tolist()
            stamps = np.sort(rng.uniform(0, 1e6, (batch, length)), axis=1).tolist()
            item_seq, time_lag = pad_batch(tokens, stamps, 1e6, length)
            (xhat,) = plain.diffusion_session.run(
                ["xhat"], {"item_seq": item_seq, "noise": plain.noise}
            )
            cached.embed_tokens(tokens, stamps, 1e6)  # every row now cached
            feeds = {"item_seq": item_seq, "time_lag": time_lag, "noise": plain.noise}
            variants: dict[str, Callable[[], object]] = {
                "single graph": partial(plain.session.run, None, feeds),
                "diffusion part": partial(
                    plain.diffusion_session.run,
                    None,
                    {"item_seq": item_seq, "noise": plain.noise},
                ),
                "attention part": partial(
                    plain.attention_session.run,
                    None,
                    {"item_seq": item_seq, "time_lag": time_lag, "xhat": xhat},
                ),
                "embed, all miss": partial(plain.embed_tokens, tokens, stamps, 1e6),
                "embed, all hit": partial(cached.embed_tokens, tokens, stamps, 1e6),
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(3):
                for call in variants.values():
                    call()
            for _ in range(max(10, args.runs // batch)):
                for name, call in variants.items():
                    started = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - started) * 1000)
            for name, sample in times.items():
                p50, p99 = np.percentile(sample, [50, 99])
                print(f"{path.name}\tB={batch}\t{name:16s}\tp50 {p50:7.3f} ms\tp99 {p99:7.3f} ms")
    print(f"loadavg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
