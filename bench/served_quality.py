"""Served quality: replay a run's test users through the real ``POST /recall`` and compare.

    .venv/bin/python bench/served_quality.py --run runs/NAME [--artifacts A --index I] \\
        [--concurrency 16] [--session-max-len 200] [--json-out FILE.json]

Takes a trained run (``model.pt``, ``run.json``: data source and split), rebuilds its
leave-one-out split as ``model.train.load_run`` does, and measures HR@10, HR@100 and NDCG@10
of the *test* targets (each user's last behaviour) at five stages, each changing one thing:

1. ``pytorch_exact``: the trained PyTorch model ranking all items, every earlier item of the
   user excluded: the offline evaluator's own code (``model.harness.rank_targets``, the
   numbers ``t2diff evaluate`` reports for test);
2. ``onnx_exact``: the exported ``user_tower.onnx`` in ONNX Runtime with the service's noise
   (``contracts.tower.make_noise`` of the manifest's seed) on the same windows and lags
   (``contracts.tower.pad_batch``, lag = target time - behaviour time), exact inner product
   over ``item_embeddings.npy``, same exclusion: the gap to 1 is the export;
3. ``onnx_exact_session``: as 2, but excluding only what the service can see, the newest
   ``--session-max-len`` behaviours that Redis keeps: the gap to 2 is the session cap;
4. ``onnx_index``: the queries of 3 searched in the FAISS index with the service's loader
   and exclusion (``LoadedIndex.search_excluding``, the index's nprobe unless ``--nprobe``):
   the gap to 3 is the approximate index;
5. ``served``: a private ``redis-server`` filled with each user's history (every behaviour
   before the test one, in order, with its timestamp) by the service's own bulk loader
   (``service.sessions.load_sessions_from_sequences``, what ``t2diff sessions load`` runs),
   the service (``python -m service.server``) on the export and index, and one
   ``POST /recall`` (``k``, ``exclude_seen``) per test user, ``--concurrency`` in flight
   (httpx); the gap to 4 is the Redis round trip, the service's lags from its wall clock
   and micro-batching.  A non-200 or ``degraded`` answer counts as a miss and is reported;
   with more than ``--max-bad`` of them the tool exits 1.

Timestamps (``--clock``): the service computes lags as its wall clock minus each stored
behaviour's time, the evaluator as the target's time minus it.  ``replay`` (default) shifts
each user's behaviours so that the test behaviour falls at the moment the replay starts (the
user asks for recommendations when their next behaviour happens), so served lags are the
offline ones plus the seconds the replay has run; ``raw`` stores the logged times as they
are (ML-1M's are positions, i.e. seconds after 1970).

Without ``--artifacts`` the run is exported with ``t2diff export``, without ``--index`` the
index is built with ``t2diff build-index`` (``--factory``; ``Flat`` is exact), both under
``--workdir`` (a temporary directory by default).  Prints a table and writes a JSON with the
figures, the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from contracts.manifest import TowerExportManifest  # noqa: E402
from contracts.tower import (  # noqa: E402
    INPUT_ITEM_SEQ,
    INPUT_NOISE,
    INPUT_TIME_LAG,
    OUTPUT_USER_EMBEDDING,
    make_noise,
    pad_batch,
)
from model.data import SequenceData  # noqa: E402
from model.metrics import metrics_from_ranks  # noqa: E402
from t2diff_cli.local_stack import (  # noqa: E402
    RedisServer,
    free_port,
    service_process,
    service_settings,
)

CUTOFFS = (10, 100)
REPORTED = ("hr@10", "hr@100", "ndcg@10")
MISS = 1_000_000_000  # the rank of a target that is not in a returned list
STAGES = ("pytorch_exact", "onnx_exact", "onnx_exact_session", "onnx_index", "served")
DEFAULT_SESSION_MAX_LEN = 200  # service.settings / contracts.sessions DEFAULT_MAX_LEN


@dataclass
class HeldOut:
    """Each test user's history (every behaviour before the test one) and test item."""

    user_ids: list[str]
    tokens: list[np.ndarray]  # history tokens, oldest first (token = embedding row + 1)
    stamps: list[np.ndarray]  # their logged timestamps
    target_tokens: np.ndarray  # [U]
    target_stamps: np.ndarray  # [U]
    target_positions: np.ndarray  # [U] flat positions in the run's SequenceData
    item_ids: np.ndarray  # token t is item_ids[t - 1]

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def target_ids(self) -> list[str]:
        return [str(self.item_ids[t - 1]) for t in self.target_tokens]


@dataclass
class Replay:
    """What ``POST /recall`` answered for each user."""

    lists: list[list[str]]
    statuses: Counter[int] = field(default_factory=Counter)
    degraded: Counter[str] = field(default_factory=Counter)
    cold_start: int = 0
    bad: int = 0
    samples: list[str] = field(default_factory=list)  # the first few bad answers
    wall_s: float = 0.0


def held_out_users(data: SequenceData, test_targets: np.ndarray, users: np.ndarray) -> HeldOut:
    """The histories and targets of ``users`` (indices into ``data``'s users)."""
    starts = data.offsets[:-1]
    targets = test_targets[users]
    return HeldOut(
        user_ids=[str(data.user_ids[u]) for u in users],
        tokens=[data.items[starts[u] : p] for u, p in zip(users, targets, strict=True)],
        stamps=[data.timestamps[starts[u] : p] for u, p in zip(users, targets, strict=True)],
        target_tokens=data.items[targets],
        target_stamps=data.timestamps[targets],
        target_positions=targets,
        item_ids=data.item_ids,
    )


def history_sequences(users: HeldOut, shift: np.ndarray) -> SequenceData:
    """The histories as a ``SequenceData`` for the service's bulk loader, each user's
    timestamps moved by ``shift[u]`` seconds."""
    lengths = np.array([len(t) for t in users.tokens], dtype=np.int64)
    return SequenceData(
        user_ids=np.asarray(users.user_ids),
        item_ids=users.item_ids,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=np.concatenate(users.tokens).astype(np.int64),
        timestamps=np.concatenate([s + d for s, d in zip(users.stamps, shift, strict=True)]).astype(
            np.float64
        ),
    )


def list_ranks(lists: Sequence[Sequence[str]], targets: Sequence[str]) -> np.ndarray:
    """0-based position of each target in its returned list, ``MISS`` when absent."""
    ranks = np.full(len(targets), MISS, dtype=np.int64)
    for u, (items, target) in enumerate(zip(lists, targets, strict=True)):
        if target in items:
            ranks[u] = items.index(target)
    return ranks


def figures(ranks: np.ndarray) -> dict[str, float]:
    metrics = metrics_from_ranks(ranks, CUTOFFS)
    return {name: metrics[name] for name in (*REPORTED, "n_users")}


# --------------------------------------------------------------------------- offline stages


def pytorch_ranks(run: Any, users: np.ndarray) -> np.ndarray:
    """Stage 1: the evaluator's ranks of the test targets (``evaluate_run``'s test split)."""
    from model.harness import DeviceSequences, rank_targets

    max_len = int(run.meta["model_config"]["max_seq_len"])
    exclude = bool(run.meta["train_config"].get("exclude_seen", True))
    sequences = DeviceSequences.from_data(run.data, "cpu")
    return rank_targets(run.model, sequences, run.split.test_targets[users], max_len, exclude)


def onnx_embeddings(
    artifacts: Path, users: HeldOut, threads: int, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2's queries: the exported tower on the offline windows and lags, with the
    service's noise; (user embeddings [U, d], item embeddings [N, d])."""
    import onnxruntime as ort

    manifest = TowerExportManifest.load(artifacts)
    max_len, noise_shape, noise_seed = manifest.require_tower()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(artifacts / "user_tower.onnx"), options, providers=["CPUExecutionProvider"]
    )
    noise = make_noise(noise_shape, noise_seed)
    out: list[np.ndarray] = []
    for first in range(0, len(users), batch):
        rows = slice(first, first + batch)
        item_seq, time_lag = pad_batch(
            users.tokens[rows], users.stamps[rows], users.target_stamps[rows], max_len
        )
        (embedding,) = session.run(
            [OUTPUT_USER_EMBEDDING],
            {INPUT_ITEM_SEQ: item_seq, INPUT_TIME_LAG: time_lag, INPUT_NOISE: noise},
        )
        out.append(np.asarray(embedding, dtype=np.float32))
    items = np.load(artifacts / "item_embeddings.npy", allow_pickle=False).astype(np.float32)
    return np.concatenate(out), items


def exact_ranks(
    queries: np.ndarray,
    items: np.ndarray,
    exclude: Sequence[np.ndarray],
    target_rows: np.ndarray,
    k: int,
    batch: int = 1024,
) -> tuple[np.ndarray, list[list[int]]]:
    """Exact inner-product ranks of the targets (excluded rows never rank; ties do not
    count against the target, as in the evaluator) and each user's exact top-``k`` rows."""
    ranks = np.empty(len(queries), dtype=np.int64)
    tops: list[list[int]] = []
    for first in range(0, len(queries), batch):
        scores = queries[first : first + batch] @ items.T
        for b, drop in enumerate(exclude[first : first + batch]):
            scores[b, drop] = -np.inf
        targets = scores[np.arange(len(scores)), target_rows[first : first + batch]]
        ranks[first : first + len(scores)] = (scores > targets[:, None]).sum(1)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
        tops.extend(np.take_along_axis(top, order, 1).tolist())
    return ranks, tops


def index_lists(
    index_dir: Path,
    queries: np.ndarray,
    exclude: Sequence[np.ndarray],
    k: int,
    nprobe: int | None,
    batch: int = 64,
) -> tuple[list[list[str]], dict[str, Any]]:
    """Stage 4: the service's index loader and seen-item exclusion, offline."""
    from index_builder import configure_threads
    from index_builder.loaded import load_index

    configure_threads(1)
    index = load_index(index_dir)
    lists: list[list[str]] = []
    for first in range(0, len(queries), batch):
        _, rows = index.search_excluding(
            queries[first : first + batch],
            k,
            [set(e.tolist()) for e in exclude[first : first + batch]],
            nprobe=nprobe,
        )
        lists.extend(index.ids_for(rows))
    info = {
        "index_version": index.version,
        "factory": index.manifest.raw.get("factory"),
        "nprobe": nprobe if nprobe is not None else index.nprobe,
        "k_factor": index.k_factor,
    }
    return lists, info


# --------------------------------------------------------------------------- served stage


async def replay(
    base_url: str,
    user_ids: Sequence[str],
    k: int,
    budget_ms: int,
    concurrency: int,
    timeout_s: float = 60.0,
) -> Replay:
    """One ``POST /recall`` per user, at most ``concurrency`` in flight."""
    result = Replay(lists=[[] for _ in user_ids])
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, position: int, user_id: str) -> None:
        body = {"user_id": user_id, "k": k, "exclude_seen": True, "budget_ms": budget_ms}
        async with gate:
            try:
                response = await client.post("/recall", json=body)
            except httpx.HTTPError as exc:
                result.statuses[0] += 1
                result.degraded[f"transport:{type(exc).__name__}"] += 1
                result.bad += 1
                return
        result.statuses[response.status_code] += 1
        if response.status_code != 200:
            result.bad += 1
            if len(result.samples) < 3:
                result.samples.append(f"{response.status_code} {response.text[:300]}")
            return
        answer = response.json()
        result.cold_start += bool(answer.get("cold_start"))
        if answer.get("degraded"):
            result.degraded[str(answer.get("degraded_reason"))] += 1
            result.bad += 1
            return  # the popular fallback is not the model's answer: a miss
        result.lists[position] = [item["item_id"] for item in answer["items"]]

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as client:
        await asyncio.gather(*(one(client, p, u) for p, u in enumerate(user_ids)))
    result.wall_s = time.perf_counter() - started
    return result


def cli(*args: str | Path) -> None:
    """``t2diff ARGS`` as its own process (what an operator runs)."""
    command = [sys.executable, "-m", "t2diff_cli.main", *map(str, args)]
    subprocess.run(command, cwd=ROOT, check=True)


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def print_table(stages: dict[str, dict[str, float]], reference: str) -> None:
    base = stages[reference]
    print(
        f"\n{'stage':<20} {'users':>6} {'HR@10':>8} {'HR@100':>8} {'NDCG@10':>8}   vs {reference}"
    )
    for name, row in stages.items():
        rel = ", ".join(
            f"{m} {100 * (row[m] - base[m]) / base[m]:+.2f}%" if base[m] else f"{m} n/a"
            for m in ("hr@10", "hr@100")
        )
        print(
            f"{name:<20} {row['n_users']:>6} {row['hr@10']:>8.4f} {row['hr@100']:>8.4f} "
            f"{row['ndcg@10']:>8.4f}   {rel}"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="training run directory")
    parser.add_argument("--artifacts", type=Path, help="its export (default: export it)")
    parser.add_argument("--index", type=Path, help="its index (default: build one)")
    parser.add_argument("--factory", help="build-index --factory when building (Flat: exact)")
    parser.add_argument("--nprobe", type=int, help="T2DIFF_NPROBE (default: the index's)")
    parser.add_argument("--workdir", type=Path, help="exports, logs (default: a temp dir)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--budget-ms", type=int, default=5000, help="each request's budget_ms")
    parser.add_argument(
        "--session-max-len",
        type=int,
        default=DEFAULT_SESSION_MAX_LEN,
        help="behaviours Redis keeps per user (loader and T2DIFF_SESSION_MAX_LEN)",
    )
    parser.add_argument("--clock", choices=("replay", "raw"), default="replay")
    parser.add_argument("--users", type=int, help="only this many test users (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, offline")
    parser.add_argument("--redis-url", help="use this Redis (its --prefix keys are replaced)")
    parser.add_argument("--prefix", default="t2diff", help="T2DIFF_REDIS_PREFIX")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra T2DIFF_* setting for the service, repeatable",
    )
    parser.add_argument("--ready-timeout-s", type=float, default=180.0)
    parser.add_argument("--max-bad", type=int, default=0, help="non-200 + degraded allowed")
    parser.add_argument("--skip-pytorch", action="store_true", help="no stage 1 (no torch)")
    parser.add_argument("--json-out", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.k < 10:
        parser.error("--k must be >= 10 (HR@10 is reported)")
    for pair in args.service_env:
        if "=" not in pair:
            parser.error(f"--service-env expects KEY=VALUE, got {pair!r}")
    return args


def run_report(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from model.train import load_run

    started = time.time()
    notes: list[str] = []
    run = load_run(args.run, "cpu")
    everyone = np.arange(run.data.n_users)
    if args.users is not None and args.users < len(everyone):
        rng = np.random.default_rng(args.seed)
        everyone = np.sort(rng.choice(everyone, size=args.users, replace=False))
    users = held_out_users(run.data, run.split.test_targets, everyone)
    print(f"{args.run}: {run.meta['model_name']}, {len(users)} test users, "
          f"{run.data.n_items} items")  # fmt: skip

    artifacts, index_dir = args.artifacts, args.index
    version = f"sq-{Path(args.run).resolve().name}"
    if artifacts is None:
        artifacts = workdir / "artifacts" / version
        cli("export", "--run", args.run, "--out", artifacts)
    if index_dir is None:
        index_dir = workdir / "indexes" / version
        extra = ["--factory", args.factory] if args.factory else []
        cli("build-index", "--artifacts", artifacts, "--out", index_dir, *extra)
    exported_ids = json.loads((artifacts / "item_ids.json").read_text())
    if exported_ids != [str(i) for i in run.data.item_ids]:
        raise SystemExit(f"{artifacts}: its item ids are not those of {args.run}")
    manifest = TowerExportManifest.load(artifacts)
    window = int(run.meta["model_config"]["max_seq_len"])
    if manifest.max_seq_len is not None and manifest.max_seq_len != window:
        notes.append(f"export window {manifest.max_seq_len} != training window {window}")
    if args.session_max_len < (manifest.max_seq_len or window):
        notes.append(
            f"Redis keeps {args.session_max_len} behaviours, fewer than the tower's window "
            f"{manifest.max_seq_len}: served windows are shorter than offline ones"
        )
    history_lengths = np.array([len(t) for t in users.tokens])
    capped = int((history_lengths > args.session_max_len).sum())
    notes.append(
        f"{capped} of {len(users)} test users have more than {args.session_max_len} earlier "
        "behaviours: the service excludes only the seen items Redis keeps"
    )

    stages: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    if not args.skip_pytorch:
        stages["pytorch_exact"] = figures(pytorch_ranks(run, everyone))
    t_pytorch = time.perf_counter() - t0
    del run

    t0 = time.perf_counter()
    queries, items = onnx_embeddings(artifacts, users, args.threads)
    target_rows = users.target_tokens - 1
    full_seen = [np.unique(t - 1) for t in users.tokens]
    session_seen = [np.unique(t[-args.session_max_len :] - 1) for t in users.tokens]
    ranks, _ = exact_ranks(queries, items, full_seen, target_rows, args.k)
    stages["onnx_exact"] = figures(ranks)
    ranks, exact_tops = exact_ranks(queries, items, session_seen, target_rows, args.k)
    stages["onnx_exact_session"] = figures(ranks)
    t_onnx = time.perf_counter() - t0

    t0 = time.perf_counter()
    offline_lists, index_info = index_lists(index_dir, queries, session_seen, args.k, args.nprobe)
    target_ids = users.target_ids
    stages["onnx_index"] = figures(list_ranks(offline_lists, target_ids))
    t_index = time.perf_counter() - t0

    # ----- served: Redis (the service's loader), the service, POST /recall per user
    anchor = time.time()
    if args.clock == "replay":
        shift = anchor - users.target_stamps
    else:
        shift = np.zeros(len(users))
    histories = history_sequences(users, shift)
    from service.sessions import load_sessions_from_sequences

    redis_server: RedisServer | None = None
    redis_url = args.redis_url
    if redis_url is None:
        redis_server = RedisServer(workdir=workdir / "redis")
        redis_server.start()
        redis_url = redis_server.url
    try:
        t0 = time.perf_counter()
        loaded = load_sessions_from_sequences(
            redis_url, histories, prefix=args.prefix, max_len=args.session_max_len
        )
        t_load = time.perf_counter() - t0
        port = free_port()
        env = service_settings(artifacts, index_dir, redis_url, port)
        env.update(
            T2DIFF_REDIS_PREFIX=args.prefix,
            T2DIFF_SESSION_MAX_LEN=str(args.session_max_len),
            T2DIFF_MAX_K=str(max(args.k, 1000)),
            T2DIFF_MAX_BUDGET_MS=str(max(args.budget_ms, 5000)),
            T2DIFF_WATCH_INTERVAL_S="0",
            T2DIFF_LOG_LEVEL="WARNING",
            OMP_WAIT_POLICY="PASSIVE",
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        )
        if args.nprobe is not None:
            env["T2DIFF_NPROBE"] = str(args.nprobe)
        env.update(dict(pair.split("=", 1) for pair in args.service_env))
        log_path = workdir / "service.log"
        with service_process(env, args.ready_timeout_s, cwd=ROOT, log_path=log_path) as base:
            served = asyncio.run(
                replay(base, users.user_ids, args.k, args.budget_ms, args.concurrency)
            )
    finally:
        if redis_server is not None:
            redis_server.close()
    stages["served"] = figures(list_ranks(served.lists, target_ids))
    replay_drift = time.time() - anchor

    same_as_index = sum(a == b for a, b in zip(served.lists, offline_lists, strict=True))
    exact_ids = [[str(users.item_ids[r]) for r in top] for top in exact_tops]
    overlap = float(
        np.mean(
            [len(set(s) & set(e)) / args.k for s, e in zip(served.lists, exact_ids, strict=True)]
        )
    )
    reference = "pytorch_exact" if "pytorch_exact" in stages else "onnx_exact"
    print_table(stages, reference)
    base_row, served_row = stages[reference], stages["served"]
    gaps = {
        m: (served_row[m] - base_row[m]) / base_row[m] if base_row[m] else None for m in REPORTED
    }
    print(
        f"\nserved: {sum(served.statuses.values())} requests in {served.wall_s:.1f}s "
        f"({len(users) / max(served.wall_s, 1e-9):.0f}/s, {args.concurrency} in flight), "
        f"statuses {dict(served.statuses)}, degraded {dict(served.degraded) or 0}, "
        f"cold start {served.cold_start}"
    )
    print(
        f"served top-{args.k} identical to the offline index search for {same_as_index} of "
        f"{len(users)} users; mean overlap with the exact top-{args.k} {overlap:.4f}"
    )
    within = all(g is not None and abs(g) <= 0.01 for g in gaps.values())
    print(
        f"served vs {reference}: "
        + ", ".join(f"{m} {100 * g:+.2f}%" for m, g in gaps.items() if g is not None)
        + f" -> {'within' if within else 'NOT within'} 1%"
    )
    for note in notes:
        print(f"note: {note}")

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "run": str(args.run),
        "model_name": manifest.model_name,
        "model_version": manifest.model_version,
        "artifacts": str(artifacts),
        "index": {"dir": str(index_dir), **index_info},
        "settings": {
            "k": args.k,
            "concurrency": args.concurrency,
            "budget_ms": args.budget_ms,
            "session_max_len": args.session_max_len,
            "tower_window": manifest.max_seq_len,
            "clock": args.clock,
            "replay_drift_s": round(replay_drift, 1),
            "service_env": args.service_env,
        },
        "users": len(users),
        "stages": stages,
        "served_vs_" + reference: gaps,
        "served_within_1pct": within,
        "served": {
            "statuses": {str(k): v for k, v in served.statuses.items()},
            "degraded": dict(served.degraded),
            "bad": served.bad,
            "bad_samples": served.samples,
            "cold_start": served.cold_start,
            "sessions_loaded": loaded,
            "wall_s": round(served.wall_s, 2),
            "same_list_as_offline_index": same_as_index,
            "mean_overlap_with_exact_topk": overlap,
        },
        "seconds": {
            "pytorch": round(t_pytorch, 1),
            "onnx_exact": round(t_onnx, 1),
            "index": round(t_index, 1),
            "redis_load": round(t_load, 1),
            "total": round(time.time() - started, 1),
        },
        "notes": notes,
        "workdir": str(args.workdir) if args.workdir else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="served-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run_report(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    bad = report["served"]["bad"]
    if bad > args.max_bad:
        print(f"error: {bad} non-200 or degraded answers (allowed {args.max_bad})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
