"""The T2Diff user tower on a GPU: every serving path in one run, beside the yardstick.

    python bench/gpu_tower.py --out DIR [--batches 1,8,64,256] [--recall]

For each trained ML-1M run (``--runs``: width 32 and width 16, T = 50) on real test-split
windows and the evaluator's noise (seed 0), per batch size:

* ``torch_eager``: ``T2Diff.user_embedding`` (the reference; TF32 off everywhere);
* ``fast_graph_{fp32,bf16,fp16}``: ``model.fast_tower.FastTower`` in a torch CUDA graph,
  float32 or under autocast;
* ``fused_{ieee,tf32x3,tf32}[_sN][_wN]``: ``model.fused_tower.FusedTower`` (the reverse
  process as one Triton kernel, samples per program ``sN``, warps ``wN``) in a CUDA graph;
* ``ort_cuda`` / ``ort_cuda_graph``: the fast ONNX export on ONNX Runtime's CUDA EP with IO
  binding, without and with ``enable_cuda_graph`` (one session per batch size), when
  onnxruntime-gpu is importable; ``ort_cuda_threads*``: B=1 requests from 8 threads on one
  shared session or on a session per thread;
* ``yardstick_graph_w{64,32}``: ``tower_yardstick.py`` (``--yardstick``) with its CUDA graph,
  run in this process.

Every path's output is compared with the reference on the same inputs (max abs diff,
printed and in ``checks.json``).  ``--recall``: ML-1M test-split metrics of the reduced
precision and fused paths against the reference, same noise (``recall.json``).
Rows (header of ``docs/results/inference.csv``, times per call) go to ``DIR/gpu_rows.csv``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from torch_tower_timing import percentiles, time_calls  # noqa: E402

from model.base import Batch  # noqa: E402
from model.fast_tower import FastTower  # noqa: E402
from model.harness import DeviceSequences, evaluate  # noqa: E402
from model.train import load_run  # noqa: E402

HEADER = ["machine", "backend", "steps", "batch", "p50_ms", "p95_ms", "p99_ms", "samples_per_s"]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def graphed(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], Any], torch.Tensor]:
    """``fn`` captured in a CUDA graph (warm-up on a side stream first): (replay, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, out


class Recorder:
    """Rows and checks; each row is also appended to ``csv_path`` at once (a run stopped
    by its time limit keeps what it measured)."""

    def __init__(self, machine: str, steps: int, csv_path: Path) -> None:
        self.machine, self.steps, self.csv_path = machine, steps, csv_path
        self.rows: list[list[Any]] = []
        self.checks: dict[str, float] = {}
        csv_path.write_text(",".join(HEADER) + "\n")

    def add(self, row: list[Any]) -> None:
        self.rows.append(row)
        with open(self.csv_path, "a") as handle:
            handle.write(",".join(map(str, row)) + "\n")
        print(",".join(map(str, row)), flush=True)

    def time(self, backend: str, batch: int, fn: Callable[[], Any], runs: int) -> float:
        p50, p95, p99 = percentiles(time_calls(fn, torch.device("cuda"), runs, warmup=10))
        row = [self.machine, backend, self.steps, batch, f"{p50:.3f}", f"{p95:.3f}", f"{p99:.3f}",
               f"{batch / (p50 / 1000):.1f}"]  # fmt: skip
        self.add(row)
        return p50

    def check(self, backend: str, batch: int, out: torch.Tensor, ref: torch.Tensor) -> None:
        diff = float((out.float() - ref).abs().max())
        self.checks[f"{backend}/B{batch}"] = diff
        print(f"  check {backend} B={batch}: max |diff| vs eager {diff:.2e}", flush=True)


def fused_variants(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"ieee:1:4,tf32:2:8:uniform"`` -> [(precision, name suffix, FusedTower options), ...].

    Fields: precision, samples per program, warps, then optionally the kernel build
    (``auto``, ``pipelined``, ``uniform``, ``resident``: ``FusedUNetSteps``' ``kernel``) and
    ``exact_tail`` (``tf32x3tail``).  Three fields keep the default (auto) and the old names.
    """
    out = []
    for item in spec.split(","):
        precision, spp, warps, *rest = item.split(":")
        options: dict[str, Any] = {"samples_per_program": int(spp), "num_warps": int(warps)}
        suffix = f"_s{spp}_nw{warps}"
        if rest:
            options["kernel"] = rest[0]
            suffix += f"_{rest[0]}"
        if len(rest) > 1:  # tf32x3tail's number of tf32x3 steps at the end
            options["exact_tail"] = int(rest[1])
            suffix += f"_tail{rest[1]}"
        out.append((precision, suffix, options))
    return out


def bench_run(run_dir: Path, args: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    run = load_run(run_dir, "cuda")
    model = run.model.eval()
    width = int(run.meta["model_config"]["unet_width"])
    max_len = int(run.meta["model_config"]["max_seq_len"])
    sequences = DeviceSequences.from_data(run.data, "cuda")
    noise = torch.randn(model.noise_shape, generator=torch.Generator().manual_seed(0)).cuda()
    targets = torch.as_tensor(run.split.test_targets, device="cuda")
    # The re-expressions fold their constants on the CPU (as the export does), then move.
    fast = FastTower(copy.deepcopy(model).cpu()).cuda().eval()
    fused: dict[str, torch.nn.Module] = {}
    if args.fused:
        from model.fused_tower import FusedTower

        for precision, suffix, options in fused_variants(args.fused):
            fused[f"fused_{precision}{suffix}"] = (
                FusedTower(copy.deepcopy(model).cpu(), precision=precision, **options).cuda().eval()
            )
    ort_paths = ort_setup(model, max_len, args) if args.ort else None
    best: dict[str, float] = {}
    for batch_size in [int(b) for b in args.batches.split(",")]:
        batch = sequences.batch(targets[:batch_size], max_len)
        item_seq, time_lag = batch.item_seq.contiguous(), batch.time_lag.contiguous()
        with torch.no_grad():
            ref = model.user_embedding(Batch(item_seq, time_lag), noise).float()
        suffix = f"_w{width}"

        def eager(batch: Batch = Batch(item_seq, time_lag)) -> torch.Tensor:
            with torch.no_grad():
                return model.user_embedding(batch, noise)

        if not args.only_fused:
            rec.time("torch_eager" + suffix, batch_size, eager, args.eager_runs)
        for label, dtype in {} if args.only_fused else AUTOCAST.items():

            def fast_call(
                dtype: torch.dtype | None = dtype, inputs: tuple = (item_seq, time_lag, noise)
            ) -> torch.Tensor:
                with torch.no_grad(), torch.autocast("cuda", dtype or torch.float32,
                                                     enabled=dtype is not None):  # fmt: skip
                    return fast(*inputs)

            replay, out = graphed(fast_call)
            rec.check(f"fast_graph_{label}{suffix}", batch_size, out, ref)
            rec.time(f"fast_graph_{label}{suffix}", batch_size, replay, args.runs)
        for name, tower in fused.items():
            try:

                def fused_call(
                    tower: torch.nn.Module = tower, inputs: tuple = (item_seq, time_lag, noise)
                ) -> torch.Tensor:
                    with torch.no_grad():
                        return tower(*inputs)

                t0 = time.perf_counter()
                replay, out = graphed(fused_call)
                print(f"  {name}: compile + capture {time.perf_counter() - t0:.1f} s", flush=True)
                rec.check(name + suffix, batch_size, out, ref)
                p50 = rec.time(name + suffix, batch_size, replay, args.runs)
                best[f"{name}/B{batch_size}"] = p50
            except Exception as error:  # noqa: BLE001 - a failing variant must not end the run
                print(f"  {name} B={batch_size} FAILED: {type(error).__name__}: {error}"[:2000])
        if ort_paths is not None:
            ort_bench(ort_paths, item_seq, time_lag, noise, ref, suffix, rec, args)
    result: dict[str, Any] = {"width": width, "fused_p50": best}
    if args.recall:
        result["recall"] = recall_check(
            model, fast, fused, sequences, run, max_len, autocast=not args.only_fused
        )
    if ort_paths is not None and args.ort_threads:
        ort_threads(ort_paths, sequences, targets, max_len, noise, f"_w{width}", rec)
    return result


# ------------------------------------------------------------------ ONNX Runtime CUDA EP


def ort_setup(model: torch.nn.Module, max_len: int, args: argparse.Namespace) -> dict | None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not importable: no ORT rows")
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"no CUDAExecutionProvider ({ort.get_available_providers()}): no ORT rows")
        return None
    from model.export import export_onnx

    path = Path(tempfile.mkdtemp()) / "user_tower.onnx"
    export_onnx(copy.deepcopy(model).cpu(), path, max_len)  # export_onnx moves its model to cpu
    return {"ort": ort, "path": path}


def ort_session(paths: dict, graph: bool) -> Any:
    ort = paths["ort"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_reuse = False  # its planner is super-linear in ~5k nodes (bench_tower)
    cuda = {"use_tf32": "0"}
    if graph:
        cuda["enable_cuda_graph"] = "1"
    return ort.InferenceSession(str(paths["path"]), options,
                                providers=[("CUDAExecutionProvider", cuda)])  # fmt: skip


def ort_bound(paths: dict, session: Any, feeds: dict[str, np.ndarray], dim: int) -> tuple:
    """IO binding with inputs and output resident on the GPU; (run, binding)."""
    ort = paths["ort"]
    binding = session.io_binding()
    keep = []
    for name, value in feeds.items():
        device_value = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
        keep.append(device_value)
        binding.bind_ortvalue_input(name, device_value)
    batch = next(iter(feeds.values())).shape[0]
    output = ort.OrtValue.ortvalue_from_shape_and_type([batch, dim], np.float32, "cuda", 0)
    keep.append(output)
    binding.bind_ortvalue_output(session.get_outputs()[0].name, output)

    def run() -> None:
        session.run_with_iobinding(binding)

    return run, binding, keep


def ort_bench(paths: dict, item_seq: torch.Tensor, time_lag: torch.Tensor, noise: torch.Tensor,
              ref: torch.Tensor, suffix: str, rec: Recorder, args: argparse.Namespace) -> None:  # fmt: skip
    feeds = {"item_seq": item_seq.cpu().numpy(), "time_lag": time_lag.cpu().numpy(),
             "noise": noise.cpu().numpy()}  # fmt: skip
    batch = item_seq.shape[0]
    for graph in (False, True):
        name = ("ort_cuda_graph" if graph else "ort_cuda") + suffix
        try:
            session = ort_session(paths, graph)
            run, binding, _keep = ort_bound(paths, session, feeds, ref.shape[1])
            run()
            out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).cuda()
            rec.check(name, batch, out, ref)
            rec.time(name, batch, run, args.runs)
        except Exception as error:  # noqa: BLE001
            print(f"  {name} B={batch} FAILED: {type(error).__name__}: {error}"[:2000])


def ort_threads(paths: dict, sequences: DeviceSequences, targets: torch.Tensor, max_len: int,
                noise: torch.Tensor, suffix: str, rec: Recorder, threads: int = 8,
                seconds: float = 3.0) -> None:  # fmt: skip
    """B=1 requests from ``threads`` threads: one shared session vs a session per thread
    (each with its own CUDA graph); p50/p95/p99 per request, samples/s overall."""
    feeds = []
    for i in range(threads):
        batch = sequences.batch(targets[i : i + 1], max_len)
        feeds.append({"item_seq": batch.item_seq.cpu().numpy(),
                      "time_lag": batch.time_lag.cpu().numpy(), "noise": noise.cpu().numpy()})  # fmt: skip
    for mode in ("shared", "per_thread_graph"):
        try:
            if mode == "shared":
                session = ort_session(paths, graph=False)
                runs = [lambda f=f, s=session: s.run(None, f) for f in feeds]
            else:
                bound = [ort_bound(paths, ort_session(paths, graph=True), f, 64) for f in feeds]
                runs = [b[0] for b in bound]
            for run in runs:
                run()
            latencies: list[list[float]] = [[] for _ in range(threads)]
            stop = time.perf_counter() + seconds

            def worker(
                i: int, stop: float = stop, runs: list = runs, latencies: list = latencies
            ) -> None:
                while time.perf_counter() < stop:
                    start = time.perf_counter()
                    runs[i]()
                    latencies[i].append(time.perf_counter() - start)

            pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            begin = time.perf_counter()
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            elapsed = time.perf_counter() - begin
            flat = [x for per in latencies for x in per]
            p50, p95, p99 = percentiles(flat)
            row = [rec.machine, f"ort_cuda_threads{threads}_{mode}{suffix}", rec.steps, 1,
                   f"{p50:.3f}", f"{p95:.3f}", f"{p99:.3f}", f"{len(flat) / elapsed:.1f}"]  # fmt: skip
            rec.add(row)
        except Exception as error:  # noqa: BLE001
            print(f"  ort threads {mode} FAILED: {type(error).__name__}: {error}"[:2000])


# ------------------------------------------------------------------ recall


class _Path:
    """A tower behind the evaluator's contract (``user_embedding``, ``full_sort_scores``)."""

    def __init__(self, fn: Callable[[Batch, torch.Tensor], torch.Tensor], model: Any,
                 reference: Any) -> None:  # fmt: skip
        self.fn, self.model, self.reference = fn, model, reference
        self.noise_shape = model.noise_shape
        self.max_diff = 0.0

    def eval(self) -> _Path:
        return self

    def full_sort_scores(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            user = self.fn(batch, noise).float()
            expected = self.reference.user_embedding(batch, noise).float()
        self.max_diff = max(self.max_diff, float((user - expected).abs().max()))
        return user @ self.model.item_embeddings().T


def recall_check(model: Any, fast: Any, fused: dict, sequences: DeviceSequences, run: Any,
                 max_len: int, autocast: bool = True) -> dict:  # fmt: skip
    paths: dict[str, Callable[[Batch, torch.Tensor], torch.Tensor]] = {}
    for label in ("bf16", "fp16") if autocast else ():
        dtype = AUTOCAST[label]

        def autocast_path(batch: Batch, noise: torch.Tensor, dtype: Any = dtype) -> torch.Tensor:
            with torch.autocast("cuda", dtype):
                return fast(batch.item_seq, batch.time_lag, noise)

        paths[f"fast_{label}"] = autocast_path
    for name, tower in fused.items():
        paths[name] = lambda batch, noise, tower=tower: tower(batch.item_seq, batch.time_lag, noise)
    out: dict[str, Any] = {}
    for split, targets in (("valid", run.split.valid_targets), ("test", run.split.test_targets)):
        reference = evaluate(model, sequences, targets, max_len)
        out[split] = {"reference": reference}
        for name, fn in paths.items():
            wrapped = _Path(fn, model, model)
            try:
                metrics = evaluate(wrapped, sequences, targets, max_len)  # type: ignore[arg-type]
            except Exception as error:  # noqa: BLE001 - a failing path must not end the run
                print(f"  recall {name} FAILED: {type(error).__name__}: {error}"[:2000])
                continue
            metrics["max_embedding_diff"] = wrapped.max_diff
            out[split][name] = metrics
            print(f"  recall {split} {name}: recall@20 {metrics['recall@20']:.4f} "
                  f"(reference {reference['recall@20']:.4f}), ndcg@10 {metrics['ndcg@10']:.4f} "
                  f"({reference['ndcg@10']:.4f}), max |emb diff| {wrapped.max_diff:.2e}",
                  flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------ yardstick


def yardstick(path: Path, widths: list[int], batches: list[int], rec: Recorder, runs: int) -> None:
    """``tower_yardstick.py``'s model with its CUDA graph, timed by this script's helpers."""
    spec = importlib.util.spec_from_file_location("tower_yardstick", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    for width in widths:
        torch.manual_seed(0)
        model = module.Reverse(64, width, rec.steps).eval().cuda()
        for batch_size in batches:
            x = torch.randn(batch_size, 64, 50, device="cuda")
            noise = torch.randn(rec.steps + 1, batch_size, 64, 50, device="cuda")

            def call(
                x: torch.Tensor = x, noise: torch.Tensor = noise, model: Any = model
            ) -> torch.Tensor:
                with torch.inference_mode():
                    return model(x, noise)

            replay, _ = graphed(call)
            rec.time(f"yardstick_graph_w{width}", batch_size, replay, runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs-dirs", default="runs/ml1m-t2diff-s2,runs/ml1m-t2diff_w16_s2")
    parser.add_argument("--fused-per-run", default="", help="';'-separated --fused per run dir")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--eager-runs", type=int, default=30)
    parser.add_argument("--fused", default="tf32x3:1:4,tf32:1:4,bf16:1:4")
    parser.add_argument(
        "--only-fused", action="store_true", help="no eager/FastTower rows (reference still run)"
    )
    parser.add_argument("--ort", action="store_true")
    parser.add_argument("--ort-threads", action="store_true")
    parser.add_argument("--recall", action="store_true")
    parser.add_argument("--yardstick", type=Path)
    parser.add_argument("--yardstick-widths", default="64,32")
    parser.add_argument("--machine", default="h100")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rec = Recorder(args.machine, 50, args.out / "gpu_rows.csv")
    results: dict[str, Any] = {}
    try:
        if args.yardstick:
            widths = [int(w) for w in args.yardstick_widths.split(",")]
            yardstick(args.yardstick, widths, [int(b) for b in args.batches.split(",")], rec,
                      args.runs)  # fmt: skip
        # The yardstick ran at torch's defaults (cuDNN convolutions in TF32), as in its
        # README; the project's paths and their reference run in float32 throughout.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        per_run = args.fused_per_run.split(";") if args.fused_per_run else []
        for i, run_dir in enumerate(args.runs_dirs.split(",")):
            if per_run:
                args.fused = per_run[i]
            results[run_dir] = bench_run(Path(run_dir), args, rec)
    finally:
        (args.out / "checks.json").write_text(json.dumps(rec.checks, indent=1))
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
