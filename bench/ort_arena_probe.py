"""ONNX Runtime's CPU memory arena per session, shared, or off: latency, interleaved.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ort_arena_probe.py ARTIFACTS_DIR

The service shares one arena across its sessions (``service/tower.py``): a session's own
arena keeps the peak of every batch size it has run, which held the previous versions'
memory over hot swaps (docs/results/service.md, "Memory over hot swaps").  This prints
p50/p99 per request of a graph at batch 1 and 32 with each session's own arena ("own"),
the process-wide one ("shared") and none ("off"), the runs interleaved so that a noisy box
affects all alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODES = ("own", "shared", "off")


def session(path: Path, mode: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_reuse = False
    options.enable_cpu_mem_arena = mode != "off"
    if mode == "shared":
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, batch: int, manifest: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for node in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in node.shape]
        if node.name == "item_seq":
            out[node.name] = rng.integers(1, int(manifest["num_items"]) + 1, shape).astype(np.int64)
        else:
            out[node.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--graph", default="user_tower.onnx")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    memory = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
    sessions = {mode: session(args.artifacts / args.graph, mode) for mode in MODES}
    for batch in (int(b) for b in args.batches.split(",")):
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        data = feeds(sessions["own"], batch, manifest)
        for mode in MODES:  # warm-up
            for _ in range(3):
                sessions[mode].run(None, data)
        for _ in range(args.rounds):
            for mode in MODES:
                for _ in range(args.calls):
                    start = time.perf_counter()
                    sessions[mode].run(None, data)
                    times[mode].append((time.perf_counter() - start) * 1e3)
        p = {mode: np.percentile(times[mode], [50, 99]) for mode in MODES}
        cells = " | ".join(f"{m} p50 {p[m][0]:.2f} p99 {p[m][1]:.2f} ms" for m in MODES)
        ratios = ", ".join(f"{m}/own p50 {p[m][0] / p['own'][0]:.3f}" for m in MODES[1:])
        print(f"{args.graph} B={batch}: {cells} ({ratios})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
