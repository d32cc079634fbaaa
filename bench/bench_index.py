"""ANN index benchmark: FAISS IVF-PQ (+ refine) against exact inner-product search.

For each corpus size (synthetic, clustered, d=64 by default) and each factory string (the
project default from ``index_builder.default_factory`` unless ``--factories`` is given; the
token ``default`` stands for it, ``opq`` for the default with an OPQ rotation in front), it
builds the index with ``index_builder.build_index`` (all cores), then for each ``nprobe``:

* recall@10 and recall@100 against exact search (``IndexFlatIP``) on ``--queries`` queries,
  with the refine shortlist the service uses (``shortlist_k_factor``: ``k_factor *
  max(k, 100)`` candidates re-scored);
* p50 / p99 latency of single-query top-100 searches on ONE OpenMP thread (after a warm-up
  of ``--warmup`` queries), the way the service searches (per-call ``SearchParameters``);
* batched QPS: all queries in one ``search`` call on all cores (``--batch-threads``).

Synthetic data: ``sqrt(N)`` cluster centres (unit norm, drawn from 32 "topics" so that
clusters have neighbours, like real item embeddings), items = centre + Gaussian noise,
rescaled by a log-normal norm (popular items score higher under inner product).  Queries
are drawn like user embeddings: a noisy Dirichlet mixture of 1-3 cluster centres, not
uniform noise (which would sit far from every item and make recall meaningless).

``--real-artifacts DIR`` adds one row set on a real export (``item_embeddings.npy``; user
queries from ``query_embeddings.npy`` when present, else ``sample_queries``); it is skipped
with a message when the directory does not exist.

Each row's timings are taken with other processes possibly running on the machine: the
1-minute load average (``/proc/loadavg``) at the time is printed and written, with the
row, to ``--log`` (JSON lines) so the results page can show it beside each timing.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_index.py \\
        --sizes 100000,1000000 --nprobes 8,16,32,64,128 --factories default,opq \\
        --machine cpu-2core --csv docs/results/index.csv --log docs/results/raw/index_bench.jsonl
    .venv/bin/python bench/bench_index.py --plot docs/results/index.png \\
        --csv docs/results/index.csv --skip-synthetic   # only the plot, from the CSV
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_builder.build import (  # noqa: E402
    TARGET_RECALL,
    build_index,
    default_factory,
    default_k_factor,
    default_nprobe,
    exact_topk,
    load_artifacts,
    make_search_params,
    sample_queries,
    shortlist_k_factor,
    tune_search_params,
)

HEADER = [
    "machine",
    "n_items",
    "dim",
    "factory",
    "nprobe",
    "recall_at_10",
    "recall_at_100",
    "p50_ms",
    "p99_ms",
    "qps_batched",
    "bytes_per_item",
    "build_s",
]
#: Extra columns of ``--sweep-csv`` after :data:`HEADER`.
SWEEP_EXTRA = ["queries", "k_factor", "tuned", "load1"]
N_TOPICS = 32


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def synthetic_corpus(
    n: int, dim: int, seed: int, chunk: int = 500_000
) -> tuple[np.ndarray, np.ndarray]:
    """(items float32 [n, dim], cluster centres float32 [C, dim]), C = sqrt(n)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(16, int(math.sqrt(n)))
    topics = rng.standard_normal((N_TOPICS, dim))
    centres = topics[rng.integers(0, N_TOPICS, n_clusters)] + 0.8 * rng.standard_normal(
        (n_clusters, dim)
    )
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Cluster sizes vary (Zipf-like weights), as item categories do.
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.5
    weights /= weights.sum()
    items = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        labels = rng.choice(n_clusters, size=stop - start, p=weights)
        block = centres[labels] + rng.standard_normal((stop - start, dim)) * (0.5 / math.sqrt(dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        block *= rng.lognormal(0.0, 0.2, (stop - start, 1))
        items[start:stop] = block
    return items, centres.astype(np.float32)


#: ``--query-dist`` choices: the most cluster centres a query mixes.  ``mixture`` (1-3) is
#: the benchmark's distribution; ``single`` (one centre, like the issue's yardstick) is a
#: second, easier one reported beside it, never instead of it.
QUERY_DISTS = {"mixture": 3, "single": 1}


def user_queries(centres: np.ndarray, n: int, seed: int, max_centres: int = 3) -> np.ndarray:
    """Noisy Dirichlet mixtures of 1-``max_centres`` cluster centres, unit norm, [n, dim]."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    queries = np.empty((n, dim), dtype=np.float32)
    for row in range(n):
        count = int(rng.integers(1, max_centres + 1))
        picked = centres[rng.choice(len(centres), size=count, replace=False)]
        mix = rng.dirichlet(np.ones(count)) @ picked
        mix /= np.linalg.norm(mix)
        query = mix + rng.standard_normal(dim) * (0.3 / math.sqrt(dim))
        queries[row] = query / np.linalg.norm(query)
    return queries


def resolve_factory(token: str, n: int, dim: int) -> str:
    base = default_factory(n, dim)
    if token == "default":
        return base
    if token == "opq":
        m = base.split(",PQ")[1].split("x")[0]
        return f"OPQ{m},{base}"
    return token


def index_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as handle:
        faiss.write_index(index, handle.name)
        return os.path.getsize(handle.name)


def recall(ann: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = sum(len(np.intersect1d(a[a >= 0], e[:k])) for a, e in zip(ann, exact, strict=True))
    return hits / (k * len(ann))


def measure(
    index: faiss.Index,
    queries: np.ndarray,
    exact: np.ndarray,
    nprobe: int,
    k_factor: float,
    args: argparse.Namespace,
) -> dict[str, float]:
    faiss.omp_set_num_threads(args.batch_threads)
    out: dict[str, float] = {}
    for k in (10, 100):
        params = make_search_params(index, nprobe, shortlist_k_factor(k, k_factor))
        _, rows = index.search(queries, k, params=params)
        out[f"recall_at_{k}"] = recall(rows, exact, k)
    params = make_search_params(index, nprobe, shortlist_k_factor(100, k_factor))
    # Batched QPS, all cores: one warm call, then the best of --qps-repeats timed calls.
    index.search(queries, 100, params=params)
    best = math.inf
    for _ in range(args.qps_repeats):
        started = time.perf_counter()
        index.search(queries, 100, params=params)
        best = min(best, time.perf_counter() - started)
    out["qps_batched"] = len(queries) / best
    # Single-query latency, one thread, k=100.
    faiss.omp_set_num_threads(1)
    lat_queries = queries[: args.latency_queries]
    for b in range(min(args.warmup, len(lat_queries))):
        index.search(lat_queries[b : b + 1], 100, params=params)
    times = np.empty(len(lat_queries))
    for b in range(len(lat_queries)):
        started = time.perf_counter()
        index.search(lat_queries[b : b + 1], 100, params=params)
        times[b] = time.perf_counter() - started
    out["p50_ms"] = float(np.percentile(times, 50) * 1e3)
    out["p99_ms"] = float(np.percentile(times, 99) * 1e3)
    faiss.omp_set_num_threads(args.batch_threads)
    return out


class Writer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.csv_path: Path | None = args.csv
        if self.csv_path is not None:
            fresh = args.overwrite or not self.csv_path.exists()
            if args.overwrite and args.sweep_csv is not None:
                args.sweep_csv.unlink(missing_ok=True)
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                with open(self.csv_path, "w", newline="") as handle:
                    csv.writer(handle).writerow(HEADER)
        if args.log is not None:
            args.log.parent.mkdir(parents=True, exist_ok=True)

    def row(self, values: dict[str, object], primary: bool, extra: dict[str, object]) -> None:
        line = [values[name] for name in HEADER]
        print(
            "  ".join(f"{k}={v}" for k, v in values.items() if k not in ("machine", "dim"))
            + f"  queries={extra['queries']}  k_factor={extra['k_factor']}"
            + f"  tuned={extra['tuned']}  load1={extra['load1']}",
            flush=True,
        )
        sweep = self.args.sweep_csv
        if sweep is not None:
            new = not sweep.exists()
            with open(sweep, "a", newline="") as handle:
                if new:
                    csv.writer(handle).writerow([*HEADER, *SWEEP_EXTRA])
                csv.writer(handle).writerow([*line, *(extra[name] for name in SWEEP_EXTRA)])
        if self.csv_path is not None and primary:
            with open(self.csv_path, "a", newline="") as handle:
                csv.writer(handle).writerow(line)
        if self.args.log is not None:
            with open(self.args.log, "a") as handle:
                handle.write(json.dumps({**values, **extra}) + "\n")


def cached(path: Path | None, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()``, saved to / loaded from ``path`` (``.npy``) when a cache path is given."""
    if path is not None and path.is_file():
        return np.load(path)
    array = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
    return array


def cached_corpus(
    n: int, args: argparse.Namespace, prefix: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`synthetic_corpus` (items, centres), cached under ``prefix`` when given."""
    if prefix is not None:
        paths = Path(f"{prefix}-items.npy"), Path(f"{prefix}-centres.npy")
        if all(path.is_file() for path in paths):
            return np.load(paths[0]), np.load(paths[1])
    items, centres = synthetic_corpus(n, args.dim, args.seed)
    if prefix is not None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        np.save(paths[0], items)
        np.save(paths[1], centres)
    return items, centres


def bench_corpus(
    name: str,
    items: np.ndarray,
    query_sets: dict[str, tuple[np.ndarray, np.ndarray | None]],
    factories: list[str],
    nprobes: list[int],
    args: argparse.Namespace,
    writer: Writer,
    cache_prefix: Path | None = None,
) -> None:
    """Build each factory once and measure it on every query set.

    ``query_sets`` maps a label (``mixture``, ``single``, ``user``) to (benchmark queries,
    tuning queries or None); the first label's rows go to ``--csv``.  With ``--tune``, the
    build's own tuner (:func:`tune_search_params`, on the tuning queries, never the
    benchmark ones) picks ``(nprobe, k_factor)`` and that row is measured too.
    """
    n, dim = items.shape
    faiss.omp_set_num_threads(args.batch_threads)
    exact: dict[str, np.ndarray] = {}
    for label, (queries, _) in query_sets.items():
        started = time.perf_counter()
        path = None
        if cache_prefix is not None:
            path = Path(f"{cache_prefix}-{label}-q{len(queries)}-gt.npy")
        exact[label] = cached(path, lambda q=queries: exact_topk(items, q, 100)[1])
        print(f"[{name}/{label}] n={n} d={dim}: exact top-100 of {len(queries)} queries in "
              f"{time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
    primary_label = next(iter(query_sets))
    for token in factories:
        factory = resolve_factory(token, n, dim)
        load_before = loadavg()
        started = time.perf_counter()
        index = build_index(items, factory, seed=args.seed)
        build_s = time.perf_counter() - started
        per_item = index_bytes(index) / n
        print(f"[{name}] {factory}: built in {build_s:.1f}s (load {load_before}), "
              f"{per_item:.1f} bytes/item", flush=True)  # fmt: skip
        try:
            nlist = faiss.extract_index_ivf(index).nlist
        except RuntimeError:
            nlist = 1
        has_refine = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
        k_factors = args.k_factors if has_refine else [1.0]
        for label, (queries, tune_queries) in query_sets.items():
            settings = [(kf, p, False) for kf in k_factors for p in nprobes if p <= nlist]
            if args.tune and tune_queries is not None:
                faiss.omp_set_num_threads(args.batch_threads)
                tuned_nprobe, tuned_kf, tune_recall = tune_search_params(
                    index, items, tune_queries, 100, default_nprobe(n, factory),
                    default_k_factor(factory), TARGET_RECALL,
                )  # fmt: skip
                print(f"[{name}/{label}] tuner chose nprobe {tuned_nprobe}, k_factor "
                      f"{tuned_kf} (recall@100 {tune_recall:.4f} on the tuning queries)",
                      flush=True)  # fmt: skip
                settings.append((float(tuned_kf), tuned_nprobe, True))
            for k_factor, nprobe, tuned in settings:
                load1 = loadavg()
                result = measure(index, queries, exact[label], nprobe, k_factor, args)
                values = {
                    "machine": args.machine,
                    "n_items": n,
                    "dim": dim,
                    "factory": factory,
                    "nprobe": nprobe,
                    "recall_at_10": round(result["recall_at_10"], 4),
                    "recall_at_100": round(result["recall_at_100"], 4),
                    "p50_ms": round(result["p50_ms"], 4),
                    "p99_ms": round(result["p99_ms"], 4),
                    "qps_batched": round(result["qps_batched"], 1),
                    "bytes_per_item": round(per_item, 2),
                    "build_s": round(build_s, 2),
                }
                primary = label == primary_label and (tuned or k_factor == k_factors[0])
                writer.row(
                    values,
                    primary,
                    {
                        "corpus": name,
                        "queries": label,
                        "k_factor": k_factor,
                        "tuned": tuned,
                        "load1": load1,
                        "build_load1": load_before,
                        "batch_threads": args.batch_threads,
                        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    },
                )
        del index


def plot(csv_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    series: dict[tuple[int, str], list[tuple[float, float, int]]] = {}
    for row in rows:
        key = (int(row["n_items"]), row["factory"])
        series.setdefault(key, []).append(
            (float(row["p99_ms"]), float(row["recall_at_100"]), int(row["nprobe"]))
        )
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (n, factory), points in sorted(series.items()):
        points.sort(key=lambda p: p[2])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", label=f"N={n:,}  {factory}")
        for x, y, nprobe in points:
            ax.annotate(str(nprobe), (x, y), textcoords="offset points", xytext=(3, -9),
                        fontsize=7, color=line.get_color())  # fmt: skip
    ax.axhline(0.98, color="grey", linestyle=":", linewidth=1)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("p99 single-query latency, top-100, 1 thread (ms, log)")
    ax.set_ylabel("recall@100 vs exact (IndexFlatIP)")
    ax.set_title("FAISS IVF indexes, d=64: synthetic (mixture queries) and ML-1M (labels: nprobe)",
                 fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def ints(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=ints, default=ints("100000,1000000,5000000"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--nprobes", type=ints, default=ints("8,16,32,64,128"))
    parser.add_argument(
        "--nprobes-large", type=ints, default=ints("16,32,64"),
        help="nprobe values for corpora of >= --large items (their builds are slow)",
    )  # fmt: skip
    parser.add_argument("--large", type=int, default=2_000_000)
    parser.add_argument("--factories", default="default", help="comma list; default, opq or "
                        "a factory string (use ';' between factory strings then)")  # fmt: skip
    parser.add_argument(
        "--k-factors", type=lambda t: [float(x) for x in t.split(",") if x], default=[16.0],
        help="refine k_factor values; the first goes to --csv, all to --log / --sweep-csv",
    )  # fmt: skip
    parser.add_argument("--sweep-csv", type=Path, help="every row, with a k_factor column")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--qps-repeats", type=int, default=3)
    parser.add_argument("--batch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=platform.node())
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--log", type=Path, help="JSON lines with the load of each row")
    parser.add_argument("--overwrite", action="store_true", help="start a fresh CSV")
    parser.add_argument("--real-artifacts", type=Path, help="a user-tower export directory")
    parser.add_argument("--plot", type=Path, help="write the recall-vs-p99 PNG from --csv")
    parser.add_argument("--skip-synthetic", action="store_true", help="no synthetic corpora")
    parser.add_argument(
        "--query-dists", type=lambda t: [x for x in t.split(",") if x], default=["mixture"],
        help=f"synthetic query distributions, comma list of {sorted(QUERY_DISTS)}; the first "
        "goes to --csv (mixture: 1-3 centres, the benchmark; single: 1 centre, yardstick-like)",
    )  # fmt: skip
    parser.add_argument("--tune", action="store_true", help="also measure the setting that "
                        "the build's tuner picks (on separate tuning queries)")  # fmt: skip
    parser.add_argument("--tune-queries", type=int, default=1000)
    parser.add_argument("--cache-dir", type=Path, help="cache synthetic corpora and exact "
                        "top-100 here (.npy), e.g. /tmp/t2diff-index-cache")  # fmt: skip
    args = parser.parse_args(argv)

    plot_only = args.skip_synthetic and args.real_artifacts is None
    writer = None if plot_only else Writer(args)
    sep = ";" if ";" in args.factories else ","
    factories = [f for f in args.factories.split(sep) if f]
    print(f"faiss {faiss.__version__}, {os.cpu_count()} cores, machine {args.machine}, "
          f"k_factors {args.k_factors}, load {loadavg()}", flush=True)  # fmt: skip

    if writer is not None and not args.skip_synthetic:
        for n in args.sizes:
            started = time.perf_counter()
            prefix = None
            if args.cache_dir is not None:
                prefix = args.cache_dir / f"synthetic-n{n}-d{args.dim}-s{args.seed}"
            items, centres = cached_corpus(n, args, prefix)
            print(f"[synthetic] {n} items ready in {time.perf_counter() - started:.1f}s",
                  flush=True)  # fmt: skip
            query_sets = {
                dist: (
                    user_queries(centres, args.queries, args.seed + 1, QUERY_DISTS[dist]),
                    user_queries(centres, args.tune_queries, args.seed + 2, QUERY_DISTS[dist]),
                )
                for dist in args.query_dists
            }
            nprobes = args.nprobes_large if n >= args.large else args.nprobes
            bench_corpus("synthetic", items, query_sets, factories, nprobes, args, writer,
                         prefix)  # fmt: skip
            del items
    if writer is not None and args.real_artifacts is not None:
        if not (args.real_artifacts / "manifest.json").is_file():
            print(f"[real] {args.real_artifacts}: no export there, real-embedding row skipped")
        else:
            _, items, _, real_queries = load_artifacts(args.real_artifacts)
            if real_queries is not None:
                # Disjoint halves: tuning on one, measuring on the other.
                half = len(real_queries) // 2
                query_sets = {"user": (real_queries[half:][: args.queries], real_queries[:half])}
            else:
                query_sets = {"user": (
                    sample_queries(items, args.queries, args.seed + 1),
                    sample_queries(items, args.tune_queries, args.seed + 2),
                )}  # fmt: skip
            nprobes = [p for p in args.nprobes if p <= len(items)]
            bench_corpus("real", items, query_sets, factories, nprobes, args, writer)
    if args.plot is not None:
        if args.csv is None:
            parser.error("--plot needs --csv")
        plot(args.csv, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
