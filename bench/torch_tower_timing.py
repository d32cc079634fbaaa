"""Per-call latency of the T2Diff user tower in PyTorch, eager and with a CUDA graph.

``python bench/torch_tower_timing.py --device cuda --steps 10,50,200 --batches 1,256``
prints one CSV row per (backend, steps, batch) with the header of
``docs/results/inference.csv``.  Random weights: timing does not depend on training.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.base import Batch
from model.t2diff import T2Diff, T2DiffConfig


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    values = np.asarray(samples) * 1000
    return tuple(float(np.percentile(values, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def time_calls(  # type: ignore[no-untyped-def]
    fn, device: torch.device, runs: int, warmup: int = 10, warmup_s: float = 1.0
) -> list[float]:
    """Seconds per call of ``fn`` after at least ``warmup`` calls and ``warmup_s`` seconds
    of them.  The time floor matters on a GPU: after a compile the GPU idled and its clocks
    fell, and ten 2 ms calls do not bring them back (the first variant timed after a
    compile read ~1.5 % slower at p50 and 5 % at p99 than the same build timed later)."""
    started = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - started < warmup_s:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        done += 1
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", default="10,50,200")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--machine", default="h100")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print("machine,backend,steps,batch,p50_ms,p95_ms,p99_ms,samples_per_s")
    for steps in [int(s) for s in args.steps.split(",")]:
        torch.manual_seed(0)
        config = T2DiffConfig(dim=args.dim, unet_width=args.width, diffusion_steps=steps)
        model = T2Diff(3706, config).to(device).eval()
        for batch_size in [int(b) for b in args.batches.split(",")]:
            item_seq = torch.randint(1, 3707, (batch_size, 50), device=device)
            time_lag = torch.rand(batch_size, 50, device=device) * 1e5
            noise = torch.randn(model.noise_shape, device=device)
            batch = Batch(item_seq, time_lag)

            def eager(model=model, batch=batch, noise=noise) -> torch.Tensor:  # type: ignore[no-untyped-def]
                with torch.no_grad():
                    return model.user_embedding(batch, noise)

            variants = {"torch_eager": eager}
            if device.type == "cuda":
                reference = eager()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.no_grad():
                    for _ in range(3):
                        model.user_embedding(batch, noise)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), torch.no_grad():
                    static_out = model.user_embedding(batch, noise)
                graph.replay()
                diff = (static_out - reference).abs().max().item()
                assert diff < 1e-4, f"CUDA graph output differs from eager by {diff}"
                variants["torch_cudagraph"] = graph.replay
            for name, fn in variants.items():
                runs = args.runs if steps <= 50 else max(args.runs // 4, 20)
                p50, p95, p99 = percentiles(time_calls(fn, device, runs))
                print(
                    f"{args.machine},{name}_w{args.width},{steps},{batch_size},"
                    f"{p50:.3f},{p95:.3f},{p99:.3f},{batch_size / (p50 / 1000):.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
