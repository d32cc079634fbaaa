"""User-tower inference benchmark: PyTorch eager vs ONNX Runtime, beside the yardstick.

For each tower config (default: the shipped ML-1M one, d=64 / U-Net width 32, and the demo
one, d=32 / width 16; 3 levels, L=50, T=50) it builds a randomly initialised T2Diff (timing
does not depend on the weights; seed fixed), exports the user tower with
``model.export.export_onnx`` twice into a temporary directory (the default, fast export
through ``model.fast_tower``, and the plain trace of the training module, ``fast=False``)
and times, per batch size:

* ``torch_eager``: ``model.user_embedding`` under ``torch.no_grad`` (the reference);
* ``ort_fast``: the fast export, default ``SessionOptions`` (what ``t2diff export`` ships);
* ``ort_fast_1t``: the fast export, tuned as ``ort_cpu_tuned`` below, one intra-op thread;
* ``ort_fast_split``: the fast export, the batch cut into one chunk per core on the
  one-thread session;
* ``ort_cpu*``: the plain export (the previous default) with the settings below:
* ``ort_cpu``: ONNX Runtime CPU, default ``SessionOptions``;
* ``ort_cpu_tuned``: ORT_ENABLE_ALL, sequential, intra-op threads = cores, the optimised
  graph saved with ``optimized_model_filepath`` and re-loaded without re-optimising,
  ``enable_mem_reuse`` off (see below);
* ``ort_cpu_tuned_1t``: the same with one intra-op thread;
* ``ort_cpu_tuned_1t_io``: the same through IO binding (noise bound once; batches <= 8);
* ``ort_cpu_tuned_split``: the batch cut into one chunk per core, each chunk run at the
  same time on the one-thread session (``InferenceSession.run`` is thread-safe);
* ``ort_cuda``: only when ``CUDAExecutionProvider`` is available;
* ``yardstick_torch`` / ``yardstick_ort``: ``../shared/bench/tower_yardstick.py``
  (imported, not copied) at the same d, width and T.

Every backend of one (config, batch) cell is timed in the same loop, interleaved in a
shuffled order, so that a noisy neighbour slows them alike and the ratios hold.  Each ORT
output is checked against eager on the same inputs and noise (max abs diff <= --tol); a
mismatch stops the run (exit status 2).  Cells where other processes kept more than
``--max-others-busy`` cores busy (read from /proc/stat) are timed again.
``--extra-steps`` re-times the best CPU backend at batch 1, alone (rows ``*_solo_*``), at
those T and the configured one (the paper's Table 4: T = 10 / 50 / 200).
``--experiments`` measures answer-preserving rewrites of the export (monkey-patched here
only; model/ is untouched).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_tower.py --batches 1,8,64,256 \\
        --machine cpu-2core --csv docs/results/inference.csv --overwrite \\
        --extra-steps 10,200 --experiments   # about 19 minutes on 2 cores

``enable_mem_reuse``: ORT's memory-reuse planner is super-linear in the node count; with
~5k nodes (T=50) it takes ~20 s of the session start on 2 cores, while turning it off
loads in well under a second; the tuned sessions turn it off and the run reports both.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import importlib.util
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as ``python bench/bench_tower.py``
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from contracts.tower import (  # noqa: E402
    INPUT_ITEM_SEQ,
    INPUT_NOISE,
    INPUT_TIME_LAG,
    OUTPUT_USER_EMBEDDING,
    make_noise,
    pad_batch,
)
from model.base import Batch  # noqa: E402
from model.export import OPSET, export_onnx  # noqa: E402
from model.t2diff import T2Diff, T2DiffConfig  # noqa: E402

CSV_HEADER = ["machine", "backend", "steps", "batch", "p50_ms", "p95_ms", "p99_ms", "samples_per_s"]
DEFAULT_CONFIGS = ["w32:dim=64,unet_width=32", "w16:dim=32,unet_width=16"]
DEFAULT_YARDSTICK = REPO.parent / "shared" / "bench" / "tower_yardstick.py"
ML1M_ITEMS = 3706
ORT_VARIANTS = ("ort_cpu", "ort_cpu_tuned", "ort_cpu_tuned_1t", "ort_cpu_tuned_1t_io")


class ParityError(RuntimeError):
    """An ONNX Runtime output differs from PyTorch eager by more than the tolerance."""


# ---------------------------------------------------------------------------- configs


def parse_config(spec: str) -> tuple[str, T2DiffConfig]:
    """``NAME:key=value,...`` -> (NAME, T2DiffConfig with those fields; eval-only dropout)."""
    name, _, body = spec.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"bad --config {spec!r}: expected NAME:key=value,...")
    types = {f.name: f.type for f in fields(T2DiffConfig)}
    values: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in types:
            raise argparse.ArgumentTypeError(f"--config {spec!r}: unknown field {key!r}")
        kind = types[key]
        if kind in (bool, "bool"):
            values[key] = raw.lower() in ("1", "true", "yes")
        elif kind in (int, "int"):
            values[key] = int(raw)
        elif kind in (float, "float"):
            values[key] = float(raw)
        else:
            values[key] = raw
    return name, T2DiffConfig(**values)  # type: ignore[arg-type]


def build_model(config: T2DiffConfig, n_items: int, seed: int) -> T2Diff:
    torch.manual_seed(seed)
    return T2Diff(n_items, config).eval()


def make_inputs(
    batch: int, config: T2DiffConfig, n_items: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded histories of mixed lengths (some longer than L, some short)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, config.max_seq_len // 4), 2 * config.max_seq_len, batch)
    tokens = [rng.integers(1, n_items + 1, n).tolist() for n in lengths]
    stamps = [np.sort(rng.uniform(0, 1e7, n)).tolist() for n in lengths]
    return pad_batch(tokens, stamps, now=1.1e7, max_seq_len=config.max_seq_len)


# ---------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """``prepare(item_seq, time_lag)`` returns a zero-argument call giving ``[B, d]``."""

    name: str
    prepare: Callable[[np.ndarray, np.ndarray], Callable[[], np.ndarray]]
    load_s: float = 0.0
    parity: bool = True  # compared with torch eager (the yardstick is another model)
    info: dict[str, object] = field(default_factory=dict)
    max_batch: int | None = None  # not timed above this batch (see --io-max-batch)


def eager_backend(name: str, model: T2Diff, noise: np.ndarray) -> Backend:
    noise_t = torch.from_numpy(noise)

    def prepare(item_seq: np.ndarray, time_lag: np.ndarray) -> Callable[[], np.ndarray]:
        batch = Batch(torch.from_numpy(item_seq), torch.from_numpy(time_lag))

        def call() -> np.ndarray:
            with torch.no_grad():
                return model.user_embedding(batch, noise_t).numpy()

        return call

    return Backend(name, prepare, info={"torch_threads": torch.get_num_threads()})


def count_nodes(path: Path) -> tuple[int, collections.Counter[str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    return sum(counts.values()), counts


def ort_session(
    path: Path,
    *,
    tuned: bool,
    threads: int,
    workdir: Path,
    providers: list | None = None,
) -> tuple[ort.InferenceSession, float, dict[str, object]]:
    """A session as the variant wants it; returns (session, seconds to create it, info).

    ``tuned``: optimise once at ORT_ENABLE_ALL into a file, then load that file with
    optimisations off (what a service restart would do); memory-reuse planning off.
    """
    providers = providers or ["CPUExecutionProvider"]
    info: dict[str, object] = {}
    if not tuned:
        started = time.perf_counter()
        session = ort.InferenceSession(str(path), ort.SessionOptions(), providers=providers)
        return session, time.perf_counter() - started, info
    optimised = workdir / f"{path.stem}.opt.onnx"  # shared by the thread variants
    if not optimised.exists():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimised)
        options.enable_mem_reuse = False
        options.log_severity_level = 3  # the "hardware specific optimizations" warning
        started = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=providers)
        info["optimise_s"] = time.perf_counter() - started
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.enable_mem_reuse = False
    started = time.perf_counter()
    session = ort.InferenceSession(str(optimised), options, providers=providers)
    info["optimised_nodes"] = count_nodes(optimised)[0]
    return session, time.perf_counter() - started, info


def ort_backend(
    name: str,
    session: ort.InferenceSession,
    noise: np.ndarray,
    load_s: float,
    *,
    iobinding: bool = False,
    info: dict[str, object] | None = None,
) -> Backend:
    noise_value = ort.OrtValue.ortvalue_from_numpy(noise)

    def prepare(item_seq: np.ndarray, time_lag: np.ndarray) -> Callable[[], np.ndarray]:
        if not iobinding:
            feeds = {INPUT_ITEM_SEQ: item_seq, INPUT_TIME_LAG: time_lag, INPUT_NOISE: noise}
            return lambda: session.run([OUTPUT_USER_EMBEDDING], feeds)[0]
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NOISE, noise_value)
        dim = noise.shape[-1]
        out = ort.OrtValue.ortvalue_from_shape_and_type([item_seq.shape[0], dim], np.float32)
        binding.bind_ortvalue_output(OUTPUT_USER_EMBEDDING, out)

        def call() -> np.ndarray:
            # A request brings new arrays, so they are bound on every call.
            binding.bind_cpu_input(INPUT_ITEM_SEQ, item_seq)
            binding.bind_cpu_input(INPUT_TIME_LAG, time_lag)
            session.run_with_iobinding(binding)
            return out.numpy()

        return call

    return Backend(name, prepare, load_s=load_s, info=dict(info or {}))


def split_backend(
    name: str, session: ort.InferenceSession, noise: np.ndarray, workers: int
) -> Backend:
    """One chunk of the batch per worker thread, all on the same (one-thread) session."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-split")

    def prepare(item_seq: np.ndarray, time_lag: np.ndarray) -> Callable[[], np.ndarray]:
        feeds = [
            {INPUT_ITEM_SEQ: seq, INPUT_TIME_LAG: lag, INPUT_NOISE: noise}
            for seq, lag in zip(
                np.array_split(item_seq, workers), np.array_split(time_lag, workers), strict=True
            )
            if len(seq)
        ]
        if len(feeds) == 1:
            return lambda: session.run([OUTPUT_USER_EMBEDDING], feeds[0])[0]

        def call() -> np.ndarray:
            futures = [pool.submit(session.run, [OUTPUT_USER_EMBEDDING], f) for f in feeds]
            return np.concatenate([f.result()[0] for f in futures])

        return call

    return Backend(name, prepare, info={"workers": workers})


def load_yardstick(path: Path) -> ModuleType | None:
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("tower_yardstick", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yardstick_backends(
    module: ModuleType, suffix: str, config: T2DiffConfig, workdir: Path, seed: int
) -> list[Backend]:
    """The yardstick's Reverse at our d, width and T: torch eager and ORT as it runs them."""
    torch.manual_seed(seed)
    d, steps = config.dim, config.diffusion_steps
    model = module.Reverse(d, config.unet_width, steps).eval()
    seq = model.unet.seq

    def eager_prepare(item_seq: np.ndarray, _: np.ndarray) -> Callable[[], np.ndarray]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(item_seq.shape[0], d, seq, generator=gen)
        noise = torch.randn(steps + 1, item_seq.shape[0], d, seq, generator=gen)

        def call() -> np.ndarray:
            with torch.inference_mode():
                return model(x, noise).numpy()

        return call

    path = workdir / f"yardstick_{suffix}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, d, seq), torch.randn(steps + 1, 1, d, seq)),
            str(path),
            input_names=["X", "noise"],
            output_names=["xhat"],
            dynamic_axes={"X": {0: "B"}, "noise": {1: "B"}},
            opset_version=OPSET,
            dynamo=False,
        )
    options = ort.SessionOptions()  # the yardstick's own settings: ORT_ENABLE_ALL, defaults
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started

    def ort_prepare(item_seq: np.ndarray, _: np.ndarray) -> Callable[[], np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {
            "X": rng.standard_normal((item_seq.shape[0], d, seq), dtype=np.float32),
            "noise": rng.standard_normal((steps + 1, item_seq.shape[0], d, seq), np.float32),
        }
        return lambda: session.run(None, feeds)[0]

    nodes = count_nodes(path)[0]
    return [
        Backend(f"yardstick_torch_{suffix}", eager_prepare, parity=False),
        Backend(
            f"yardstick_ort_{suffix}", ort_prepare, load_s, parity=False, info={"nodes": nodes}
        ),
    ]


# ---------------------------------------------------------------------------- timing


@dataclass
class Cell:
    backend: str
    steps: int
    batch: int
    times_ms: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))

    @property
    def samples_per_s(self) -> float:
        return self.batch / (self.percentile(50) / 1e3)

    def row(self, machine: str) -> list[str]:
        return [
            machine,
            self.backend,
            str(self.steps),
            str(self.batch),
            f"{self.percentile(50):.3f}",
            f"{self.percentile(95):.3f}",
            f"{self.percentile(99):.3f}",
            f"{self.samples_per_s:.1f}",
        ]


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy CPU-seconds of the machine, CPU-seconds of this process, wall clock)."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(values) - values[3] - values[4]  # minus idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


def others_busy(before: tuple[float, float, float] | None) -> float | None:
    """Cores kept busy by other processes since ``before`` (noise on the timings)."""
    after = cpu_snapshot()
    if before is None or after is None or after[2] <= before[2]:
        return None
    machine, own, wall = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, (machine - own) / wall)


def runs_for(batch: int, runs: int, min_runs: int) -> int:
    """Batch 1 gets ``runs`` (200 by default, enough for a p99); big batches fewer."""
    return max(min_runs, int(runs / math.sqrt(batch)))


def check_parity(name: str, reference: np.ndarray, output: np.ndarray, tol: float) -> float:
    if output.shape != reference.shape:
        raise ParityError(f"{name}: output shape {output.shape} != eager {reference.shape}")
    diff = float(np.abs(output.astype(np.float64) - reference).max())
    if not diff <= tol:  # also catches NaN
        raise ParityError(f"{name}: max |ort - eager| = {diff:.3g} > {tol:g}")
    return diff


def time_interleaved(
    calls: dict[str, Callable[[], np.ndarray]],
    *,
    warmup: int,
    runs: int,
    min_runs: int,
    cap_s: float,
    seed: int,
) -> dict[str, list[float]]:
    """Warm each call up, then time rounds of one call each, in a shuffled order per round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    order = list(calls)
    times: dict[str, list[float]] = {name: [] for name in order}
    shuffle = random.Random(seed)
    started = time.perf_counter()
    for done in range(1, runs + 1):
        shuffle.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if done >= min_runs and time.perf_counter() - started > cap_s:
            break
    return times


def measure_cell(
    backends: list[Backend],
    item_seq: np.ndarray,
    time_lag: np.ndarray,
    args: argparse.Namespace,
    steps: int,
    reference: str | None,
) -> tuple[list[Cell], dict[str, float]]:
    batch = item_seq.shape[0]
    backends = [b for b in backends if b.max_batch is None or batch <= b.max_batch]
    calls = {b.name: b.prepare(item_seq, time_lag) for b in backends}
    diffs: dict[str, float] = {}
    if reference is not None:
        ref = calls[reference]().astype(np.float64)
        for backend in backends:
            if backend.parity and backend.name != reference:
                diffs[backend.name] = check_parity(
                    f"{backend.name} T={steps} B={batch}", ref, calls[backend.name](), args.tol
                )
    best: tuple[float, dict[str, list[float]]] | None = None
    for attempt in range(args.busy_retries + 1):
        if attempt:
            print(f"  [co-load {best[0]:.2f} cores > {args.max_others_busy}: cell timed again]")
            time.sleep(args.busy_wait_s)
        snapshot = cpu_snapshot()
        times = time_interleaved(
            calls,
            warmup=max(1, min(args.warmup, args.warmup * 8 // batch)),
            runs=runs_for(batch, args.runs, args.min_runs),
            min_runs=args.min_runs,
            cap_s=args.cell_cap_s,
            seed=args.seed + batch + attempt,
        )
        busy = others_busy(snapshot)
        if busy is None:
            best = (0.0, times)
            break
        print(f"  [T={steps} B={batch}: other processes kept ~{busy:.2f} cores busy]")
        if best is None or busy < best[0]:
            best = (busy, times)  # the quietest attempt is the one kept
        if busy <= args.max_others_busy:
            break
    assert best is not None
    times = best[1]
    return [Cell(name, steps, batch, t) for name, t in times.items()], diffs


def print_cells(cells: list[Cell], diffs: dict[str, float]) -> None:
    for cell in cells:
        diff = diffs.get(cell.backend)
        note = f"  max|diff| vs eager {diff:.2e}" if diff is not None else ""
        print(
            f"  {cell.backend:<26} T={cell.steps:<3} B={cell.batch:<4} n={len(cell.times_ms):<4}"
            f" p50 {cell.percentile(50):9.2f}  p95 {cell.percentile(95):9.2f}"
            f"  p99 {cell.percentile(99):9.2f} ms  {cell.samples_per_s:9.1f} samples/s{note}",
            flush=True,
        )


class CsvSink:
    def __init__(self, path: Path | None, machine: str, overwrite: bool) -> None:
        self.path, self.machine = path, machine
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not overwrite:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), None)
            if header != CSV_HEADER:
                raise SystemExit(f"{path}: header {header} is not {CSV_HEADER}; use --overwrite")
        else:
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerow(CSV_HEADER)

    def write(self, cells: list[Cell]) -> None:
        if self.path is None:
            return
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            for cell in cells:
                writer.writerow(cell.row(self.machine))


# ---------------------------------------------------------------------------- main bench


def cpu_backends(
    suffix: str,
    path: Path,
    noise: np.ndarray,
    workdir: Path,
    cores: int,
    args: argparse.Namespace,
    reuse_probe: bool,
) -> list[Backend]:
    out: list[Backend] = []
    session, load_s, info = ort_session(path, tuned=False, threads=0, workdir=workdir)
    out.append(ort_backend(f"ort_cpu_{suffix}", session, noise, load_s, info=info))
    session, load_s, info = ort_session(path, tuned=True, threads=cores, workdir=workdir)
    out.append(ort_backend(f"ort_cpu_tuned_{suffix}", session, noise, load_s, info=info))
    session, load_s, info = ort_session(path, tuned=True, threads=1, workdir=workdir)
    out.append(ort_backend(f"ort_cpu_tuned_1t_{suffix}", session, noise, load_s, info=info))
    io = ort_backend(f"ort_cpu_tuned_1t_io_{suffix}", session, noise, 0.0, iobinding=True)
    io.max_batch = args.io_max_batch
    out.append(io)
    if cores > 1:
        out.append(split_backend(f"ort_cpu_tuned_split_{suffix}", session, noise, cores))
    if reuse_probe:
        # The same optimised file, memory-reuse planning on (ORT's default): start-up cost.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        started = time.perf_counter()
        ort.InferenceSession(
            str(workdir / f"{path.stem}.opt.onnx"), options, providers=["CPUExecutionProvider"]
        )
        out[2].info["reload_with_mem_reuse_s"] = round(time.perf_counter() - started, 2)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        cuda = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        session, load_s, info = ort_session(
            path, tuned=False, threads=0, workdir=workdir, providers=cuda
        )
        out.append(ort_backend(f"ort_cuda_{suffix}", session, noise, load_s, info=info))
    return out


def fast_backends(
    suffix: str, path: Path, noise: np.ndarray, workdir: Path, cores: int
) -> list[Backend]:
    """The fast export (``model.fast_tower``): default options, tuned one-thread, split."""
    out: list[Backend] = []
    session, load_s, info = ort_session(path, tuned=False, threads=0, workdir=workdir)
    out.append(ort_backend(f"ort_fast_{suffix}", session, noise, load_s, info=info))
    session, load_s, info = ort_session(path, tuned=True, threads=1, workdir=workdir)
    out.append(ort_backend(f"ort_fast_1t_{suffix}", session, noise, load_s, info=info))
    if cores > 1:
        out.append(split_backend(f"ort_fast_split_{suffix}", session, noise, cores))
    return out


def bench_config(
    suffix: str,
    config: T2DiffConfig,
    args: argparse.Namespace,
    workdir: Path,
    sink: CsvSink,
    yardstick: ModuleType | None,
    first: bool,
) -> dict[str, object]:
    cores = os.cpu_count() or 1
    print(f"\n== {suffix}: {config}", flush=True)
    model = build_model(config, args.n_items, args.seed)
    path = workdir / f"tower_{suffix}.onnx"
    fast_path = workdir / f"tower_fast_{suffix}.onnx"
    started = time.perf_counter()
    export_onnx(model, fast_path, config.max_seq_len)
    fast_export_s = time.perf_counter() - started
    fast_nodes, fast_ops = count_nodes(fast_path)
    started = time.perf_counter()
    export_onnx(model, path, config.max_seq_len, fast=False)
    export_s = time.perf_counter() - started
    nodes, ops = count_nodes(path)
    noise = make_noise(model.noise_shape, args.seed)
    backends = [eager_backend(f"torch_eager_{suffix}", model, noise)]
    backends += fast_backends(suffix, fast_path, noise, workdir, cores)
    backends += cpu_backends(suffix, path, noise, workdir, cores, args, args.reuse_probe and first)
    if yardstick is not None:
        backends += yardstick_backends(yardstick, suffix, config, workdir, args.seed)
    if args.only:
        keep = set(args.only.split(","))
        backends = [b for b in backends if b.name.rsplit("_", 1)[0] in keep or b.name in keep]
    print(
        f"  fast export {fast_export_s:.1f} s, {fast_nodes} nodes ({dict(fast_ops.most_common(6))})"
    )
    print(f"  plain export {export_s:.1f} s, {nodes} nodes ({dict(ops.most_common(6))})")
    for backend in backends:
        print(f"  {backend.name}: session start {backend.load_s:.2f} s {backend.info}")
    summary: dict[str, object] = {
        "nodes": nodes,
        "export_s": export_s,
        "fast_nodes": fast_nodes,
        "fast_export_s": fast_export_s,
        "loads": {b.name: (b.load_s, b.info) for b in backends},
        "cells": [],
        "diffs": {},
    }
    reference = backends[0].name if backends[0].name.startswith("torch_eager") else None
    for batch in args.batch_list:
        item_seq, time_lag = make_inputs(batch, config, args.n_items, args.seed + batch)
        cells, diffs = measure_cell(
            backends, item_seq, time_lag, args, config.diffusion_steps, reference
        )
        print_cells(cells, diffs)
        sink.write(cells)
        summary["cells"] += cells  # type: ignore[operator]
        summary["diffs"].update({(k, batch): v for k, v in diffs.items()})  # type: ignore[union-attr]
    return summary


def best_cpu_backend(cells: list[Cell], suffix: str) -> str:
    """The CPU backend (variant name without the suffix) with the lowest batch-1 p50."""
    candidates = [
        c for c in cells if c.batch == 1 and not c.backend.startswith(("yardstick", "ort_cuda"))
    ]
    best = min(candidates, key=lambda c: c.percentile(50))
    variant = best.backend.removesuffix(f"_{suffix}")
    # At batch 1 the IO-binding and split variants run the very same one-thread session.
    return variant.replace("_split", "_1t").removesuffix("_io")


def bench_steps(
    variant: str,
    suffix: str,
    config: T2DiffConfig,
    steps_list: list[int],
    args: argparse.Namespace,
    workdir: Path,
    sink: CsvSink,
) -> list[Cell]:
    """Batch 1 at several T with the best CPU backend, timed alone (back to back).

    Rows are named ``<variant>_solo_<suffix>``: unlike the interleaved cells, nothing else
    runs between two calls (the steady state of a service with one model), and the
    configured T is timed the same way so that the T = 10 / 50 / 200 row is one method.
    """
    out: list[Cell] = []
    cores = os.cpu_count() or 1
    for steps in steps_list:
        cfg = T2DiffConfig(**{**config.to_dict(), "diffusion_steps": steps})
        model = build_model(cfg, args.n_items, args.seed)
        noise = make_noise(model.noise_shape, args.seed)
        eager = eager_backend(f"torch_eager_solo_{suffix}", model, noise)
        if variant.startswith("torch_eager"):
            backends = [eager]
        else:
            path = workdir / f"tower_{suffix}_T{steps}.onnx"
            started = time.perf_counter()
            export_onnx(model, path, cfg.max_seq_len, fast=variant.startswith("ort_fast"))
            export_s = time.perf_counter() - started
            one_thread = "_1t" in variant or "_split" in variant  # split at B=1 = 1 thread
            default = variant in ("ort_cpu", "ort_fast")
            threads = 1 if one_thread else (0 if default else cores)
            session, load_s, info = ort_session(
                path, tuned=not default, threads=threads, workdir=workdir
            )
            print(
                f"\n== {suffix} T={steps}: export {export_s:.1f} s, {count_nodes(path)[0]}"
                f" nodes, session start {load_s:.2f} s {info}"
            )
            if steps <= args.reuse_probe_max_steps and args.reuse_probe:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                started = time.perf_counter()
                ort.InferenceSession(
                    str(workdir / f"{path.stem}.opt.onnx"),
                    options,
                    providers=["CPUExecutionProvider"],
                )
                reuse_s = time.perf_counter() - started
                print(f"  same file with memory reuse on: session start {reuse_s:.2f} s")
            backends = [
                eager,
                ort_backend(
                    f"{variant}_solo_{suffix}",
                    session,
                    noise,
                    load_s,
                    iobinding=variant.endswith("_io"),
                ),
            ]
        item_seq, time_lag = make_inputs(1, cfg, args.n_items, args.seed + 1)
        # Eager is only the parity reference here: time the chosen backend alone.
        reference = backends[0].prepare(item_seq, time_lag)().astype(np.float64)
        timed = backends[-1:]
        if len(backends) > 1:
            diff = check_parity(
                f"{timed[0].name} T={steps}",
                reference,
                timed[0].prepare(item_seq, time_lag)(),
                args.tol,
            )
        else:
            diff = None
        cells, _ = measure_cell(timed, item_seq, time_lag, args, steps, None)
        print_cells(cells, {timed[0].name: diff} if diff is not None else {})
        sink.write(cells)
        out += cells
    return out


# ---------------------------------------------------------------------------- experiments
# Answer-preserving rewrites of the export, measured here by patching methods for the
# duration of one export.  They are suggestions for model/ (the lead decides), not changes.


def _upsample_gather(h: torch.Tensor, length: int) -> torch.Tensor:
    """Nearest x2 upsampling cut to ``length`` as one Gather with constant indices."""
    index = torch.arange(length, device=h.device) // 2
    return h.index_select(2, index)


def _patched_unet_forward(gather: bool, split_skip: bool) -> Callable:
    from model.unet import UNet1D

    def forward(
        self: UNet1D, zt: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        z = zt.transpose(1, 2)
        first = self.down[0]
        pre = self.in_z(z) + cond
        if split_skip:
            # skip(cat[z, X]) = skip_z(z) + skip_x(X); the X half is step-independent
            # (ORT's common-subexpression pass shares it between the T steps).
            h = F.silu(first.norm1(pre)) + first.step_bias(step)[:, :, None]
            h = F.silu(first.norm2(first.conv2(h)))
            weight, d = first.skip.weight, self.dim
            h = (
                h
                + F.conv1d(z, weight[:, :d])
                + F.conv1d(x.transpose(1, 2), weight[:, d:], first.skip.bias)
            )
        else:
            h = first(torch.cat([z, x.transpose(1, 2)], dim=1), step, pre=pre)
        skips, lengths = [h], [int(h.shape[2])]
        for block in self.down[1:]:
            h = block(F.avg_pool1d(h, 2, ceil_mode=True), step)
            skips.append(h)
            lengths.append(int(h.shape[2]))
        skips.pop()
        lengths.pop()
        for block in self.up:
            skip, length = skips.pop(), lengths.pop()
            if gather:
                h = _upsample_gather(h, length)
            else:
                h = h.repeat_interleave(2, dim=2)[:, :, : skip.shape[2]]
            h = block(torch.cat([h, skip], dim=1), step)
        return self.out(h).transpose(1, 2)

    return forward


def _channel_norm_reduce(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over axis 1 of [B, C, L] written as reductions: no Transpose pair."""
    norm = self.norm  # type: ignore[attr-defined]
    mean = x.mean(dim=1, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=1, keepdim=True)
    scaled = centred / torch.sqrt(var + norm.eps)
    return scaled * norm.weight[None, :, None] + norm.bias[None, :, None]


EXPERIMENTS: dict[str, dict[str, bool]] = {
    "base": {},
    "gather_upsample": {"gather": True},
    "channel_norm_reduce": {"norm": True},
    "gather+split_skip": {"gather": True, "split_skip": True},
}


@contextlib.contextmanager
def patched(gather: bool = False, split_skip: bool = False, norm: bool = False) -> Iterator[None]:
    from model.unet import ChannelNorm, UNet1D

    saved = (UNet1D.forward, ChannelNorm.forward)
    try:
        if gather or split_skip:
            UNet1D.forward = _patched_unet_forward(gather, split_skip)  # type: ignore[method-assign]
        if norm:
            ChannelNorm.forward = _channel_norm_reduce  # type: ignore[method-assign]
        yield
    finally:
        UNet1D.forward, ChannelNorm.forward = saved  # type: ignore[method-assign]


def run_experiments(
    suffix: str, config: T2DiffConfig, args: argparse.Namespace, workdir: Path
) -> list[dict[str, object]]:
    print(f"\n== export experiments on {suffix} (tuned_1t sessions, interleaved)", flush=True)
    model = build_model(config, args.n_items, args.seed)
    noise = make_noise(model.noise_shape, args.seed)
    inputs = {b: make_inputs(b, config, args.n_items, args.seed + b) for b in args.exp_batches}
    with torch.no_grad():
        reference = {
            b: model.user_embedding(
                Batch(torch.from_numpy(s), torch.from_numpy(t)), torch.from_numpy(noise)
            )
            .numpy()
            .astype(np.float64)
            for b, (s, t) in inputs.items()
        }
    rows: list[dict[str, object]] = []
    backends: list[Backend] = []
    for name, flags in EXPERIMENTS.items():
        path = workdir / f"exp_{suffix}_{name.replace('+', '_')}.onnx"
        with patched(**flags):
            with torch.no_grad():
                eager = {
                    b: model.user_embedding(
                        Batch(torch.from_numpy(s), torch.from_numpy(t)), torch.from_numpy(noise)
                    ).numpy()
                    for b, (s, t) in inputs.items()
                }
            started = time.perf_counter()
            export_onnx(model, path, config.max_seq_len, fast=False)  # patches the plain one
            export_s = time.perf_counter() - started
        session, load_s, info = ort_session(path, tuned=True, threads=1, workdir=workdir)
        backend = ort_backend(name, session, noise, load_s, info=info)
        diff = 0.0
        for b, (s, t) in inputs.items():
            diff = max(diff, check_parity(f"{name} eager B={b}", reference[b], eager[b], args.tol))
            diff = max(
                diff,
                check_parity(f"{name} ort B={b}", reference[b], backend.prepare(s, t)(), args.tol),
            )
        raw, raw_ops = count_nodes(path)
        opt_path = workdir / f"{path.stem}.opt.onnx"
        opt, opt_ops = count_nodes(opt_path)
        row = {
            "variant": name,
            "raw_nodes": raw,
            "opt_nodes": opt,
            "max_diff": diff,
            "export_s": export_s,
            "optimise_s": info.get("optimise_s"),
            "raw_ops": dict(raw_ops.most_common(8)),
            "opt_ops": dict(opt_ops.most_common(10)),
        }
        print(f"  {name}: nodes {raw} raw -> {opt} after ORT_ENABLE_ALL; max|diff| {diff:.2e}")
        print(f"    raw {row['raw_ops']}\n    opt {row['opt_ops']}", flush=True)
        rows.append(row)
        backends.append(backend)
    for batch, (s, t) in inputs.items():
        cells, _ = measure_cell(backends, s, t, args, config.diffusion_steps, None)
        print_cells(cells, {})
        for row, cell in zip(rows, cells_by_name(cells, [b.name for b in backends]), strict=True):
            row[f"p50_b{batch}"] = cell.percentile(50)
            row[f"p99_b{batch}"] = cell.percentile(99)
    return rows


def cells_by_name(cells: list[Cell], names: list[str]) -> list[Cell]:
    index = {c.backend: c for c in cells}
    return [index[n] for n in names]


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1,8,64,256", help="comma-separated batch sizes")
    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="NAME:key=value,...",
        help=f"a T2DiffConfig to bench (repeatable); default {DEFAULT_CONFIGS}",
    )
    p.add_argument("--machine", default=platform.node() or "unknown")
    p.add_argument("--csv", type=Path, default=None, help="append rows here (header checked)")
    p.add_argument("--overwrite", action="store_true", help="start the CSV afresh")
    p.add_argument("--n-items", type=int, default=ML1M_ITEMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=200, help="timed runs at batch 1 (fewer above)")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument(
        "--cell-cap-s",
        type=float,
        default=60.0,
        help="stop timing a (config, batch) cell after this, once min-runs are done",
    )
    p.add_argument(
        "--max-others-busy",
        type=float,
        default=0.5,
        help="time a cell again when other processes kept more cores than this busy",
    )
    p.add_argument("--busy-retries", type=int, default=1)
    p.add_argument("--busy-wait-s", type=float, default=20.0)
    p.add_argument("--tol", type=float, default=1e-4, help="max |ort - eager| allowed")
    p.add_argument("--extra-steps", default="", help="e.g. 10,200: batch-1 runs at other T")
    p.add_argument("--yardstick", type=Path, default=DEFAULT_YARDSTICK)
    p.add_argument("--no-yardstick", action="store_true")
    p.add_argument("--only", default="", help="keep only these backend variants (comma list)")
    p.add_argument("--experiments", action="store_true", help="measure export rewrites")
    p.add_argument("--exp-batches", default="1,64")
    p.add_argument("--io-max-batch", type=int, default=8, help="IO-binding variant up to this")
    p.add_argument(
        "--no-reuse-probe",
        dest="reuse_probe",
        action="store_false",
        help="skip timing a memory-reuse-on session start (~20 s at T=50)",
    )
    p.add_argument("--reuse-probe-max-steps", type=int, default=50)
    p.add_argument("--workdir", type=Path, default=None, help="keep the ONNX files here")
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    args.exp_batches = [int(b) for b in args.exp_batches.split(",") if b]
    args.steps_list = [int(s) for s in args.extra_steps.split(",") if s]
    args.configs = [parse_config(c) for c in (args.config or DEFAULT_CONFIGS)]
    return args


@torch.no_grad()
def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    # A decorator, not torch.set_grad_enabled(False): the latter leaks into the caller
    # (the test suite runs this in-process before training tests).
    yardstick = None
    if not args.no_yardstick:
        yardstick = load_yardstick(args.yardstick)
        if yardstick is None:
            print(f"yardstick not found at {args.yardstick}: skipped", flush=True)
    print(
        f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} cpus, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        flush=True,
    )
    sink = CsvSink(args.csv, args.machine, args.overwrite)
    results: dict[str, object] = {}
    for index, (suffix, config) in enumerate(args.configs):
        results[suffix] = bench_config(
            suffix, config, args, workdir, sink, yardstick, first=index == 0
        )
    first_suffix, first_config = args.configs[0]
    if args.steps_list:
        cells = results[first_suffix]["cells"]  # type: ignore[index]
        variant = best_cpu_backend(cells, first_suffix)
        print(f"\nbest CPU backend at batch 1 ({first_suffix}): {variant}", flush=True)
        steps_list = sorted({*args.steps_list, first_config.diffusion_steps})
        results["steps"] = bench_steps(
            variant, first_suffix, first_config, steps_list, args, workdir, sink
        )
    if args.experiments:
        results["experiments"] = run_experiments(first_suffix, first_config, args, workdir)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            run(args, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_tower-") as tmp:
                run(args, Path(tmp))
    except ParityError as exc:
        print(f"PARITY CHECK FAILED: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"\ndone in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
