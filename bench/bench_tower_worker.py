"""The tower worker on a GPU: the service's path (socket round trip) against the kernel
alone, with parity against ONNX Runtime CPU on the same inputs.

For each export (``--artifacts``, exports of ``t2diff export`` that carry ``user_tower.pt``):

1. ``fused_graph``: in this process, the worker's own ``TowerVersion`` (fused Triton
   kernel, one CUDA graph per batch bucket); times one graph replay + synchronize with the
   inputs already on the GPU: the kernel alone.
2. ``worker_inproc``: the same object's ``embed`` (numpy in, copy to the GPU, replay, copy
   back): what the worker computes per request.
3. ``worker_socket``: ``python -m worker.server`` started as a process, timed from
   this process through ``service.remote_tower.TowerWorkerClient`` (what the service
   calls): frame encode, Unix socket, worker, answer.  The overhead of the socket is
   ``worker_socket - worker_inproc``.
4. ``worker_socket_cN``: N client threads of B = 1 requests at once, as N service processes
   sharing the worker would send them (the worker computes what queued while the GPU was
   busy as one batch; ``--no-coalesce`` on the worker to compare).

Parity: every path's embeddings against ONNX Runtime CPU (the service's default path) on the
same padded inputs and the manifest's noise (max |diff|, limit 1e-4 at tf32x3).

    python3 bench/bench_tower_worker.py --artifacts artifacts/ml1m-t2diff_w16_s2-pt \
        --batches 1,8,64,256 --runs 200 --csv $OUT/worker.csv --out $OUT

``--overhead-only`` (no GPU needed): the worker's overhead alone, round trip minus the
compute time the worker reports, with a no-op compute (``noop``), an idle wait of N ms
(``sleepN``, as while a GPU computes) or a real path (``eager``, ``fused``); worker and
client run as child processes of each ``--code-root`` (old and new checkouts in one run):

    python3 bench/bench_tower_worker.py --overhead-only --artifacts artifacts/ml1m-t2diff_w16_s2-pt \
        --device cpu --overhead-compute noop,sleep3 --batches 1,64,256 --rounds 2 \
        --code-root old=/tmp/t2diff-old --code-root new=. --csv overhead.csv

``--spin-us 0,2000,5000`` makes each spin setting (the socket's busy-polling, worker and
client) a variant of each code root, alternated as the roots are, and prints each variant
against the first (ratios of the overhead's p50/p95/p99 and of requests/s); ``C:W`` gives
the client C and the worker W (e.g. ``5000:0``, the client's poll alone).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# The code under test: this checkout, or another one (``--overhead-only --code-root``
# starts this script's worker and client children with T2DIFF_BENCH_CODE_ROOT pointing at
# it, so that an old and a new worker/client are compared in one run on one machine).
ROOT = Path(os.environ.get("T2DIFF_BENCH_CODE_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

from contracts import tower_wire as wire  # noqa: E402
from contracts.manifest import USER_TOWER_FILE, read_manifest  # noqa: E402
from contracts.tower import make_noise  # noqa: E402
from service.remote_tower import TowerWorkerClient, wait_healthy  # noqa: E402

# The worker's and the service's spin setting; ``--spin-us`` sets it for the worker child,
# and CLIENT_SPIN_ENV the client child's spin_us.
SPIN_ENV = "T2DIFF_TOWER_WORKER_SPIN_US"
CLIENT_SPIN_ENV = "T2DIFF_BENCH_CLIENT_SPIN_US"
HEADER = ["machine", "backend", "steps", "batch", "p50_ms", "p95_ms", "p99_ms", "samples_per_s"]


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = np.sort(np.asarray(samples))
    return tuple(float(np.percentile(ordered, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def inputs(manifest: dict[str, Any], batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded histories of random length (1..L) over the vocabulary, lags in seconds."""
    rng = np.random.default_rng(seed)
    length, items = int(manifest["max_seq_len"]), int(manifest["num_items"])
    item_seq = np.zeros((batch, length), np.int64)
    time_lag = np.zeros((batch, length), np.float32)
    for row in range(batch):
        n = int(rng.integers(1, length + 1))
        item_seq[row, -n:] = rng.integers(1, items + 1, n)
        time_lag[row, -n:] = np.sort(rng.exponential(3600.0 * 24, n))[::-1]
    return item_seq, time_lag


class Rows:
    def __init__(self, machine: str, steps: int) -> None:
        self.machine, self.steps, self.rows = machine, steps, []

    def add(self, backend: str, batch: int, samples_ms: list[float]) -> None:
        p50, p95, p99 = percentiles(samples_ms)
        row = [self.machine, backend, self.steps, batch, round(p50, 4), round(p95, 4),
               round(p99, 4), round(batch / (p50 / 1000), 1)]  # fmt: skip
        self.rows.append(row)
        print(f"  {backend:40s} B={batch:4d}  p50 {p50:8.3f}  p95 {p95:8.3f}  p99 {p99:8.3f} ms"
              f"  {row[-1]:10.1f} samples/s (n={len(samples_ms)})", flush=True)  # fmt: skip


def ort_reference(artifacts: Path, manifest: dict[str, Any]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = min(8, os.cpu_count() or 1)
    session = ort.InferenceSession(str(artifacts / USER_TOWER_FILE), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    noise = make_noise(manifest["noise_shape"], int(manifest["noise_seed"]))

    def run(item_seq: np.ndarray, time_lag: np.ndarray) -> np.ndarray:
        (out,) = session.run(None, {"item_seq": item_seq, "time_lag": time_lag, "noise": noise})
        return out

    return run


def bench_export(artifacts: Path, args: argparse.Namespace, rows: Rows) -> dict[str, Any]:
    import torch

    from worker.tower import TowerVersion

    manifest = read_manifest(artifacts)
    width = int(manifest["model_config"]["unet_width"])
    tag = f"{args.precision}_w{width}"
    batches = [int(b) for b in args.batches.split(",")]
    feeds = {b: inputs(manifest, b, seed=b) for b in batches}
    ort_run = ort_reference(artifacts, manifest)
    reference = {b: ort_run(*feeds[b]) for b in batches}
    checks: dict[str, Any] = {"artifacts": str(artifacts), "width": width}
    print(f"{artifacts} (width {width}, precision {args.precision})", flush=True)

    # 1-2: in this process.
    started = time.perf_counter()
    cuda = args.device == "cuda"
    version = TowerVersion(artifacts, args.device, path="fused" if cuda else "eager",
                           precision=args.precision, num_warps=args.num_warps)  # fmt: skip
    checks["load_s_inproc"] = round(time.perf_counter() - started, 2)
    checks["parity_vs_eager_at_load"] = version.parity
    for batch in batches:
        if not cuda:  # a CPU smoke run of this script: no graphs, no kernel timing
            break
        if batch not in version.graphs:  # not a bucket: embed pads it (rows 2-4 below)
            print(f"  B={batch} has no graph of its own: served padded to a bucket", flush=True)
            continue
        graph, static_seq, static_lag, out = version.graphs[batch]
        static_seq.copy_(torch.from_numpy(feeds[batch][0]))
        static_lag.copy_(torch.from_numpy(feeds[batch][1]))
        for _ in range(args.warmup):
            graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) * 1000)
        rows.add(f"fused_graph_{tag}", batch, samples)
        got = out.float().cpu().numpy()
        checks[f"fused_graph_B{batch}_max_abs_diff_vs_ort"] = float(
            np.abs(got - reference[batch]).max()
        )
    for batch in batches:
        for _ in range(args.warmup):
            version.embed(*feeds[batch])
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            got = version.embed(*feeds[batch])
            samples.append((time.perf_counter() - t0) * 1000)
        rows.add(f"worker_inproc_{tag}", batch, samples)
        checks[f"worker_inproc_B{batch}_max_abs_diff_vs_ort"] = float(
            np.abs(got - reference[batch]).max()
        )
    del version
    if cuda:
        torch.cuda.empty_cache()

    # 3-4: the worker process, through the service's client.
    sock = Path(tempfile.mkdtemp(prefix="t2tw-")) / "tower.sock"
    command = [sys.executable, "-m", "worker.server", "--artifacts", str(artifacts),
               "--socket", str(sock), "--device", args.device, "--precision", args.precision,
               "--num-warps", str(args.num_warps), *args.worker_args.split()]  # fmt: skip
    log_path = Path(args.out) / f"worker_w{width}.log" if args.out else Path(os.devnull)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            client = TowerWorkerClient(sock, timeout_s=30.0)
            started = time.perf_counter()
            # No deadline of its own (a cold Triton cache compiles for minutes); a worker
            # that exits ends the wait (WorkerExited).
            health = wait_healthy(client, float("inf"), proc=proc)
            assert health is not None
            checks["worker_start_s"] = round(time.perf_counter() - started, 2)
            checks["worker_health"] = health
            version_name = health["model_version"]
            for batch in batches:
                header = {"op": wire.OP_EMBED, "model_version": version_name}
                arrays = [("item_seq", feeds[batch][0]), ("time_lag", feeds[batch][1])]
                samples, compute, out = timed_requests(
                    client, header, arrays, args.warmup, args.runs
                )
                rows.add(f"worker_socket_{tag}", batch, samples)
                got = out["user_embedding"]
                checks[f"worker_socket_B{batch}_max_abs_diff_vs_ort"] = float(
                    np.abs(got - reference[batch]).max()
                )
                checks[f"worker_socket_B{batch}_compute_ms_p50"] = statistics.median(compute)
                checks[f"worker_socket_B{batch}_overhead_ms_p50"] = statistics.median(
                    s - c for s, c in zip(samples, compute, strict=True)
                )
            for threads in (int(n) for n in str(args.concurrency).split(",")):
                if threads > 1:
                    concurrent(client, version_name, feeds, threads, args, rows, tag, checks)
            client.close()
        finally:
            proc.terminate()
            proc.wait(30)
    return checks


def timed_requests(
    client: TowerWorkerClient,
    header: dict[str, Any],
    arrays: list[tuple[str, np.ndarray]],
    warmup: int,
    runs: int,
) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """``runs`` round trips after ``warmup``: (round trip ms, the worker's compute ms, the
    last answer's arrays)."""
    for _ in range(warmup):
        client.request(header, arrays)
    round_trips, compute = [], []
    out: dict[str, np.ndarray] = {}
    for _ in range(runs):
        t0 = time.perf_counter()
        answer, out = client.request(header, arrays)
        round_trips.append((time.perf_counter() - t0) * 1000)
        compute.append(float(answer["compute_ms"]))
    return round_trips, compute, out


def concurrent(client: TowerWorkerClient, version: str, feeds: dict, threads_n: int,
               args: argparse.Namespace, rows: Rows, tag: str,
               checks: dict[str, Any]) -> None:  # fmt: skip
    """N threads, each sending B = 1 requests back to back: requests/s and per-request ms."""
    item_seq, time_lag = (a[:1] for a in feeds[min(feeds)])
    per_thread = max(20, args.runs // threads_n)
    samples: list[float] = []
    lock = threading.Lock()

    def loop() -> None:
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            client.embed(version, item_seq, time_lag)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(threads_n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    rows.add(f"worker_socket_c{threads_n}_{tag}", 1, samples)
    checks[f"concurrent_{threads_n}x_B1_requests_per_s"] = round(len(samples) / elapsed, 1)


# --------------------------------------------------------------------------- overhead only


def noop_worker(argv: list[str]) -> None:
    """Child process: ROOT's worker whose compute is a no-op (zeros of the answer's shape),
    everything else as served: frames, socket, threads, validation, version lookup.  A round
    trip to it is the overhead alone, free of the compute's own noise."""
    from worker import server, tower

    # sleepN: the compute waits N ms with the CPU idle, as the worker does while the GPU
    # runs the kernel (the client's core idles as long): wake-ups after an idle wait cost
    # more than in a tight loop.
    sleep_s = float(os.environ.get("T2DIFF_BENCH_NOOP_SLEEP_MS", "0")) / 1000

    def embed(self: Any, item_seq: np.ndarray, time_lag: np.ndarray) -> np.ndarray:
        if sleep_s:
            time.sleep(sleep_s)
        return np.zeros((item_seq.shape[0], self.embedding_dim), np.float32)

    tower.TowerVersion.embed = embed  # type: ignore[method-assign]
    server.main(argv)


def overhead_client(args: argparse.Namespace) -> None:
    """Child process: ``--runs`` round trips per batch through ROOT's ``TowerWorkerClient``
    (the service's client); prints {batch: {"rt_ms": [...], "compute_ms": [...]}} as JSON."""
    manifest = read_manifest(args.artifacts[0], verify=False)
    # --spin-us: the variant's spin (only then passed: an old code root's client has none).
    spin = os.environ.get(CLIENT_SPIN_ENV)
    options: dict[str, Any] = {"spin_us": int(spin)} if spin else {}
    client = TowerWorkerClient(args.socket, timeout_s=60.0, **options)
    health = wait_healthy(client, 300.0, interval_s=0.05)
    assert health is not None
    version_name = health["model_version"]
    header = {"op": wire.OP_EMBED, "model_version": version_name}
    result: dict[int, dict[str, list[float]]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        item_seq, time_lag = inputs(manifest, batch, seed=batch)
        arrays = [("item_seq", item_seq), ("time_lag", time_lag)]
        rt, compute, _ = timed_requests(client, header, arrays, args.warmup, args.runs)
        result[batch] = {"rt_ms": rt, "compute_ms": compute}
    client.close()
    print(json.dumps(result))


def overhead_only(args: argparse.Namespace, rows: Rows) -> dict[str, Any]:
    """Round trip minus the worker's compute (and the round trip to a no-op worker), for
    each variant: a ``--code-root`` (LABEL=DIR; default: this checkout) x a ``--spin-us``
    value (LABEL-spinN or LABEL-spinC:W; default: the code's own spin setting).  The variants alternate
    within each compute and each of ``--rounds`` (in reverse order every other round), so
    that they share the machine's state.  Worker and client are both child processes of
    the code under test, as the worker and the service are."""
    roots = [r.partition("=")[::2] for r in args.code_root] or [("this", str(ROOT))]
    spins: list[str | None] = list(args.spin_us.split(",")) if args.spin_us else [None]
    variants = [
        (label if spin is None else f"{label}-spin{spin}", root, spin)
        for label, root in roots
        for spin in spins
    ]
    batches = [int(b) for b in args.batches.split(",")]
    samples: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    checks: dict[str, Any] = {"loadavg_start": Path("/proc/loadavg").read_text().strip()}
    print(f"loadavg at start: {checks['loadavg_start']}", flush=True)
    for round_n in range(args.rounds):
        for compute in args.overhead_compute.split(","):
            for label, root, spin in variants if round_n % 2 == 0 else variants[::-1]:
                got = _overhead_cell(args, root, compute, spin, label)
                for batch in batches:
                    cell = samples.setdefault((label, compute, batch),
                                              {"rt": [], "over": [], "compute": []})  # fmt: skip
                    rt, comp = got[str(batch)]["rt_ms"], got[str(batch)]["compute_ms"]
                    cell["rt"] += rt
                    cell["compute"] += comp
                    cell["over"] += [r - c for r, c in zip(rt, comp, strict=True)]
                print(f"  round {round_n + 1}/{args.rounds} {label} {compute}: done", flush=True)
    for (label, compute, batch), cell in sorted(samples.items()):
        # roundtrip: the service's tower stage; overhead: round trip minus the worker's own
        # compute time (in each answer); compute: that time (the staging copies included).
        for kind in ("rt", "over", "compute"):
            if kind == "compute" and compute == "noop":
                continue
            name = {"rt": "roundtrip", "over": "overhead", "compute": "compute"}[kind]
            rows.add(f"{name}_{compute}_{label}", batch, cell[kind])
            p50, p95, p99 = percentiles(cell[kind])
            checks[f"{name}_{compute}_{label}_B{batch}_ms"] = {
                "p50": round(p50, 4), "p95": round(p95, 4), "p99": round(p99, 4),
            }  # fmt: skip
        # One client sends back to back: requests/s is the inverse of the mean round trip.
        checks[f"requests_per_s_{compute}_{label}_B{batch}"] = round(
            1000 * len(cell["rt"]) / sum(cell["rt"]), 1
        )
    if len(variants) > 1:
        _print_comparison(checks, variants, args.overhead_compute.split(","), batches)
    checks["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    print(f"loadavg at end: {checks['loadavg_end']}", flush=True)
    return checks


def _overhead_cell(
    args: argparse.Namespace, root: str, compute: str, spin: str | None, label: str
) -> dict[str, dict[str, list[float]]]:
    """One worker + one client of ``root`` for one compute: the client's JSON."""
    sock = Path(tempfile.mkdtemp(prefix="t2tw-", dir="/tmp")) / "tower.sock"
    worker_args = ["--artifacts", str(args.artifacts[0]), "--socket", str(sock),
                   "--device", args.device, "--log-level", "warning",
                   *args.worker_args.split()]  # fmt: skip
    env = {**os.environ, "T2DIFF_BENCH_CODE_ROOT": root, "PYTHONPATH": root}
    env.pop(SPIN_ENV, None)
    env.pop(CLIENT_SPIN_ENV, None)
    if spin is not None:  # "N" for both, or "C:W": the client's spin_us, the worker's
        client_spin, _, worker_spin = spin.partition(":")
        env[CLIENT_SPIN_ENV] = str(int(client_spin))
        env[SPIN_ENV] = str(int(worker_spin or client_spin))
    if compute == "noop" or compute.startswith("sleep"):
        command = [sys.executable, __file__, "--noop-worker", *worker_args]
        env["T2DIFF_BENCH_NOOP_SLEEP_MS"] = compute.removeprefix("sleep").replace("noop", "0")
    else:
        # --precision reaches the fused path (R4 timed the worker's own default without it).
        precision = ["--precision", args.precision] if compute == "fused" else []
        command = [sys.executable, "-m", "worker.server", "--path", compute, *precision,
                   *worker_args]  # fmt: skip
    worker = subprocess.Popen(command, cwd=root, env=env)
    try:
        client = subprocess.run(
            [sys.executable, __file__, "--overhead-client", "--socket", str(sock),
             "--artifacts", str(args.artifacts[0]), "--batches", args.batches,
             "--runs", str(args.runs), "--warmup", str(args.warmup)],
            cwd=root, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        worker.terminate()
        worker.wait(30)
    if client.returncode != 0:
        raise RuntimeError(f"client ({label}, {compute}): {client.stderr[-2000:]}")
    return json.loads(client.stdout.strip().splitlines()[-1])


def _print_comparison(
    checks: dict[str, Any], variants: list[tuple[str, str, str | None]], computes: list[str],
    batches: list[int],
) -> None:  # fmt: skip
    """Each variant against the first: overhead p50/p95/p99 and requests/s, as ratios (on a
    shared, noisy box the ratios within one run are what compares)."""
    base = variants[0][0]
    print(f"\nagainst {base} (ratio = variant / {base}; overhead ms; requests/s):", flush=True)
    for compute in computes:
        for batch in batches:
            ref = checks[f"overhead_{compute}_{base}_B{batch}_ms"]
            ref_rps = checks[f"requests_per_s_{compute}_{base}_B{batch}"]
            for label, _, _ in variants:
                cur = checks[f"overhead_{compute}_{label}_B{batch}_ms"]
                rps = checks[f"requests_per_s_{compute}_{label}_B{batch}"]
                ratios = " / ".join(f"{cur[q]:.3f} ({cur[q] / ref[q]:.2f})"
                                    for q in ("p50", "p95", "p99"))  # fmt: skip
                print(f"  {compute:8s} B={batch:<4d} {label:24s} p50/p95/p99 {ratios}  "
                      f"{rps:8.1f} req/s ({rps / ref_rps:.2f})", flush=True)  # fmt: skip


def write_outputs(args: argparse.Namespace, rows: Rows, all_checks: list[dict[str, Any]]) -> None:
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(rows.rows)
    text = json.dumps(all_checks, indent=2, default=str)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "checks.json").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--artifacts", type=Path, action="append", required=True)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--precision", default="tf32x3")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--concurrency", default="8",
                        help="client threads of B = 1 requests, a comma list (1 = none)")  # fmt: skip
    parser.add_argument(
        "--worker-args", default="", help="extra worker options, e.g. --no-coalesce"
    )
    parser.add_argument("--machine", default="h100")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (eager, no kernel)")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="checks.json and worker logs")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the worker's overhead: round trip minus the worker's compute "
                             "(and round trip to a no-op worker); CPU is enough")  # fmt: skip
    parser.add_argument("--overhead-compute", default="noop",
                        help="with --overhead-only: worker computes, a comma list of noop "
                             "(zeros, the overhead alone), sleepN (zeros after N ms of idle "
                             "CPU, as while a GPU computes) and --path values (eager, fused)")  # fmt: skip
    parser.add_argument("--code-root", action="append", default=[], metavar="LABEL=DIR",
                        help="with --overhead-only: the checkout whose worker and client are "
                             "timed, repeatable (e.g. old=/tmp/t2diff-old new=.)")  # fmt: skip
    parser.add_argument("--spin-us", default="",
                        help="with --overhead-only: a comma list of spin settings (µs; sets "
                             f"{SPIN_ENV} for worker and client), each a variant of every "
                             "code root, e.g. 0,2000,5000; C:W = client C, worker W "
                             "(default: the code's own)")  # fmt: skip
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --overhead-only: alternate the code roots this many times",
    )
    parser.add_argument("--overhead-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", type=Path, default=None, help=argparse.SUPPRESS)
    if len(sys.argv) > 1 and sys.argv[1] == "--noop-worker":
        noop_worker(sys.argv[2:])
        return
    args = parser.parse_args()
    if args.overhead_client:
        overhead_client(args)
        return
    if args.overhead_only:
        # No torch in this process: the children import what their code root needs.
        rows = Rows(args.machine, int(read_manifest(args.artifacts[0], verify=False)
                                      ["diffusion_steps"]))  # fmt: skip
        checks = overhead_only(args, rows)
        write_outputs(args, rows, [checks])
        return
    import torch

    # fp32 for the attention half, as in the worker (parity).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    all_checks = []
    rows: Rows | None = None
    for artifacts in args.artifacts:
        manifest = read_manifest(artifacts, verify=False)
        rows = rows or Rows(args.machine, int(manifest["diffusion_steps"]))
        all_checks.append(bench_export(artifacts, args, rows))
    assert rows is not None
    write_outputs(args, rows, all_checks)
    worst = max(v for c in all_checks for k, v in c.items() if k.endswith("vs_ort"))
    print(f"largest |diff| vs ONNX Runtime CPU: {worst:.2e} (limit 1e-4)")


if __name__ == "__main__":
    main()
